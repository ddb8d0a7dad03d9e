//! What the doctor tests share: running the binary and reading its check lines.

#![allow(dead_code)] // each doctor test file uses its own part of this module

use std::process::Command;

/// Runs `zbridge doctor ARGS`, optionally under a wrapper command (`unshare`, `setpriv`).
/// Returns (exit code, stdout).
pub fn doctor(wrapper: &[&str], args: &[&str]) -> (i32, String) {
    doctor_with_env(wrapper, args, &[])
}

/// [`doctor`] with environment variables set (NODE_NAME and KUBECONFIG are otherwise removed).
pub fn doctor_with_env(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let bin = env!("CARGO_BIN_EXE_zbridge");
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd
        .arg("doctor")
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("KUBECONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run zbridge doctor");
    let stdout = String::from_utf8(out.stdout).expect("doctor prints UTF-8");
    let code = out.status.code().expect("doctor exits, not killed");
    (code, stdout)
}

/// The output lines of one check: its status line and its fix line, if any.
pub fn check_lines(out: &str, name: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            l.get(6..)
                .is_some_and(|rest| rest.starts_with(&format!("{name} ")))
        })
        .unwrap_or_else(|| panic!("no check {name:?} in:\n{out}"));
    let mut block = lines[at].to_string();
    if let Some(next) = lines.get(at + 1).filter(|l| l.starts_with("      ")) {
        block.push('\n');
        block.push_str(next);
    }
    block
}

/// `<private bpffs>/zbridge`.
pub fn pin_dir(bpffs: &testkit::BpfFs) -> String {
    bpffs.pin_dir().to_string_lossy().into_owned()
}
