//! RBAC: what the agent needs of the API server, asked by SelfSubjectAccessReview (which
//! answers for whoever the configuration authenticates as).

use super::{fail, Outcome};

/// The rules of deploy/clusterrole.yaml, as the fixes quote them.
const RULE_PODS_NAMESPACES: &str =
    r#"{apiGroups: [""], resources: ["pods", "namespaces"], verbs: ["get", "list", "watch"]}"#;
const RULE_POD_STATUS: &str = r#"{apiGroups: [""], resources: ["pods/status"], verbs: ["patch"]}"#;

/// One RBAC check: the verbs on a resource the agent needs, and the rule that grants them.
pub(super) struct AccessNeed {
    pub(super) name: &'static str,
    resource: &'static str,
    subresource: &'static str,
    verbs: &'static [&'static str],
    /// Where the agent needs it, in words.
    scope: &'static str,
    why: &'static str,
    rule: &'static str,
}

pub(super) const ACCESS_NEEDS: [AccessNeed; 3] = [
    AccessNeed {
        name: "rbac pods",
        resource: "pods",
        subresource: "",
        verbs: &["list", "watch"],
        scope: "in all namespaces",
        // RBAC has no rule per field selector: list/watch in all namespaces is what a
        // `spec.nodeName=` list needs.
        why: "the kube cache lists and watches this node's pods across all namespaces (its \
              spec.nodeName field selector does not narrow what RBAC asks for)",
        rule: RULE_PODS_NAMESPACES,
    },
    AccessNeed {
        name: "rbac namespaces",
        resource: "namespaces",
        subresource: "",
        verbs: &["list", "watch"],
        scope: "cluster-wide",
        why: "the kube cache watches namespaces for their istio.io/dataplane-mode label",
        rule: RULE_PODS_NAMESPACES,
    },
    AccessNeed {
        name: "rbac pods/status",
        resource: "pods",
        subresource: "status",
        verbs: &["patch"],
        scope: "in all namespaces",
        why: "zbridge marks the pods it captures with ambient.istio.io/redirection=enabled in \
              their status, which istiod reads",
        rule: RULE_POD_STATUS,
    },
];
/// Asks the API server, verb by verb, whether this identity may do what `need` says.
pub(super) async fn check_access(client: &kube::Client, need: &AccessNeed) -> Outcome {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let reviews: kube::Api<SelfSubjectAccessReview> = kube::Api::all(client.clone());
    let resource = match need.subresource {
        "" => need.resource.to_string(),
        sub => format!("{}/{sub}", need.resource),
    };
    let mut denied = Vec::new();
    let mut reasons = Vec::new();
    for verb in need.verbs {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(String::new()),
                    resource: Some(need.resource.to_string()),
                    subresource: (!need.subresource.is_empty())
                        .then(|| need.subresource.to_string()),
                    verb: Some(verb.to_string()),
                    // All namespaces.
                    namespace: None,
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        match reviews
            .create(&kube::api::PostParams::default(), &review)
            .await
        {
            Ok(answer) => {
                let status = answer.status.unwrap_or_default();
                if !status.allowed {
                    denied.push(*verb);
                    // A real server often gives no reason for a plain "no".
                    if let Some(reason) = status.reason.filter(|r| !r.is_empty()) {
                        reasons.push(reason);
                    }
                }
            }
            Err(e) => {
                return fail(
                    format!("cannot ask whether {verb} {resource} is allowed (SelfSubjectAccessReview): {e}"),
                    "check that the API server serves authorization.k8s.io/v1 and that the \
                     identity is authenticated (every authenticated identity may create \
                     SelfSubjectAccessReviews)",
                )
            }
        }
    }
    if denied.is_empty() {
        return Outcome::Pass(format!(
            "{} {resource} {} allowed",
            need.verbs.join(", "),
            need.scope
        ));
    }
    let reasons = match reasons.is_empty() {
        true => String::new(),
        false => format!(" ({})", reasons.join("; ")),
    };
    fail(
        format!(
            "{} {resource} {} is not allowed{reasons}; needed because {}",
            denied.join(", "),
            need.scope,
            need.why
        ),
        format!(
            "add this rule to the ClusterRole bound to zbridge's identity (deploy/clusterrole.yaml \
             has it): {}",
            need.rule
        ),
    )
}
