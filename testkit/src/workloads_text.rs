//! Workloads files made in code, for the resolver's tests and the workloads bench: large ones
//! to show that the file's checks stay fast at the bounds.

/// A v`version` file (after `version:`, the text `ztunnel`) of `entries`, each
/// `(name, cgroup)`, ambient with a distinct address.
pub fn file(version: u32, ztunnel: &str, entries: &[(&str, &str)]) -> String {
    let mut s = format!("version: {version}\n{ztunnel}workloads:\n");
    for (i, (name, cgroup)) in entries.iter().enumerate() {
        s.push_str(&format!(
            "  - name: {name}\n    cgroup: {cgroup}\n    address: 10.0.{}.{}\n    mode: ambient\n",
            i / 200,
            1 + i % 200
        ));
    }
    s
}

/// A v1 file of `n` ambient workloads, `ns/w<i>` at `/zb/pods/w<i>`.
pub fn many(n: usize) -> String {
    let names: Vec<(String, String)> = (0..n)
        .map(|i| (format!("ns/w{i}"), format!("/zb/pods/w{i}")))
        .collect();
    let entries: Vec<(&str, &str)> = names
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    file(1, "", &entries)
}

/// A v1 file of one workload whose address list has `n` addresses, IPv4 and IPv6 in turn,
/// and `10.0.1.1` once more at its end.
pub fn long_address_list(n: usize) -> String {
    let mut list = String::from("[");
    for i in 0..n {
        let (a, b) = (i / 250 % 250 + 1, i % 250 + 1);
        if i % 2 == 0 {
            list.push_str(&format!("10.{}.{a}.{b}, ", i / 62_500));
        } else {
            list.push_str(&format!("\"fd00::{:x}:{:x}\", ", i >> 16, i & 0xffff));
        }
    }
    list.push_str("10.0.1.1]");
    file(1, "", &[("a", "/a")]).replace("10.0.0.1\n", &format!("{list}\n"))
}
