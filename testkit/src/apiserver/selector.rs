//! Field selectors and namespaces: which objects a list or a watch selects.

use serde_json::Value;

use super::state::{identity, Kind, State};

/// A parsed field selector: (field, wanted value, equal?).
type FieldSelector = Vec<(String, String, bool)>;

pub(super) fn parse_field_selector(kind: Kind, selector: &str) -> Result<FieldSelector, String> {
    let mut terms = Vec::new();
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, true)
        } else {
            return Err(format!("invalid field selector term {term:?}"));
        };
        if !kind.supported_fields().contains(&field) {
            return Err(format!(
                "field label not supported: {field} (for {})",
                kind.kind()
            ));
        }
        terms.push((field.to_string(), value.to_string(), equal));
    }
    Ok(terms)
}

fn field_value(object: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        // The real server compares a missing field as its zero value.
        _ if field == "spec.hostNetwork" => "false".into(),
        _ => String::new(),
    }
}

/// What a list or watch selects: the field selector and an optional namespace.
pub(super) struct Selection {
    pub(super) kind: Kind,
    pub(super) namespace: Option<String>,
    pub(super) fields: FieldSelector,
}

impl Selection {
    pub(super) fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if identity(object).0 != *ns {
                return false;
            }
        }
        self.fields
            .iter()
            .all(|(field, value, equal)| (field_value(object, field) == *value) == *equal)
    }

    pub(super) fn current<'s>(&self, st: &'s State) -> Vec<&'s Value> {
        match self.kind {
            Kind::Pod => st.pods.values().filter(|v| self.matches(v)).collect(),
            Kind::Namespace => st.namespaces.values().filter(|v| self.matches(v)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}});
        let sel = parse_field_selector(Kind::Pod, "spec.nodeName=n1").unwrap();
        let s = Selection {
            kind: Kind::Pod,
            namespace: None,
            fields: sel,
        };
        assert!(s.matches(&pod));
        let sel = parse_field_selector(Kind::Pod, "spec.nodeName!=n1").unwrap();
        let s = Selection {
            kind: Kind::Pod,
            namespace: None,
            fields: sel,
        };
        assert!(!s.matches(&pod));
        assert!(parse_field_selector(Kind::Pod, "spec.containers=x").is_err());
        assert!(parse_field_selector(Kind::Namespace, "spec.nodeName=n1").is_err());
    }
}
