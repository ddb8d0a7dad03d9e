//! The embedded BPF object through the kernel's verifier.

use super::Outcome;

/// The words for loading the embedded object's programs into the verifier (nothing attached,
/// nothing pinned).
pub fn check_bpf_object(
    result: Result<Vec<programmer::loader::VerifiedProgram>, programmer::ProgramError>,
) -> Outcome {
    use programmer::ProgramError;
    let error = match result {
        Ok(programs) => {
            // How close each came to the verifier's limit: a program near it is the first a
            // kernel with weaker pruning refuses.
            let names: Vec<String> = programs
                .iter()
                .map(|p| match p.verified_insns {
                    Some(n) => format!("{} ({n} instructions checked)", p.name),
                    None => p.name.to_string(),
                })
                .collect();
            return Outcome::Pass(format!(
                "the verifier accepted {} (loaded, not attached; its limit is {} per program)",
                names.join(", "),
                programmer::loader::VERIFIER_INSN_LIMIT
            ));
        }
        Err(e) => e,
    };
    let text = error.to_string();
    let fix = if text.contains("Operation not permitted") {
        "run as root, or add BPF, NET_ADMIN and SYS_ADMIN to the container's securityContext \
         capabilities (loading cgroup programs needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)"
    } else if matches!(error, ProgramError::Program { .. }) {
        "the kernel's verifier refused a program (its last words are above): this kernel lacks \
         a helper or hook zbridge needs (5.10 or later), or it is a bug: report it with the \
         kernel version and the words above"
    } else {
        "the BPF object embedded in this zbridge binary is unusable: rebuild zbridge (clang -g \
         is required: the loader needs the object's BTF)"
    };
    Outcome::Fail {
        what: text,
        fix: fix.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::is_fail;
    use super::*;

    #[test]
    fn bpf_object_failures_say_what_to_do() {
        let broken = check_bpf_object(programmer::loader::verify_object_bytes(
            b"not an ELF object",
        ));
        assert!(is_fail(&broken, "rebuild zbridge"), "{broken:?}");
        let refused = check_bpf_object(Err(programmer::ProgramError::Program {
            program: "connect4".into(),
            detail: "verifier rejected: Invalid argument (os error 22):\nR1 invalid mem access"
                .into(),
        }));
        assert!(
            is_fail(&refused, "verifier refused") && is_fail(&refused, "R1 invalid mem access"),
            "{refused:?}"
        );
        let eperm = check_bpf_object(Err(programmer::ProgramError::Object(
            "load: map error: failed to create map `x`: Operation not permitted (os error 1)"
                .into(),
        )));
        assert!(
            is_fail(&eperm, "add BPF, NET_ADMIN and SYS_ADMIN"),
            "{eperm:?}"
        );
    }
}
