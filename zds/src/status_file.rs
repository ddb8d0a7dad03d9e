//! The ZDS state file: what the server writes whenever its state changes (for `zbridge dump`,
//! which runs as another process), and how it is read back.

use crate::model::Status;

/// Writes the state as JSON, whole (a temporary file renamed over the old one).
pub(crate) fn write_status(path: &std::path::Path, status: &Status) -> std::io::Result<()> {
    let pods: Vec<serde_json::Value> = status
        .pods
        .iter()
        .map(|(uid, p)| {
            serde_json::json!({
                "uid": uid,
                "namespace": p.namespace,
                "name": p.name,
                "state": p.state.as_str(),
                "error": p.error,
                "attempts": p.attempts,
            })
        })
        .collect();
    let json = serde_json::json!({
        "ztunnel_pid": status.ztunnel_pid,
        "pods": pods,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&json)?)?;
    std::fs::rename(&tmp, path)
}

/// The state as the server wrote it, for `zbridge dump`: ztunnel's pid and per pod
/// (uid, `NAMESPACE/NAME`, state, error).
pub fn read_status(path: &std::path::Path) -> std::io::Result<(Option<i32>, Vec<[String; 4]>)> {
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let pid = value["ztunnel_pid"].as_i64().map(|p| p as i32);
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let pods = value["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            [
                text(&p["uid"]),
                format!("{}/{}", text(&p["namespace"]), text(&p["name"])),
                text(&p["state"]),
                text(&p["error"]),
            ]
        })
        .collect();
    Ok((pid, pods))
}
