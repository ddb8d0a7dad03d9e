//! The workloads file itself: version 2 (`shared/spec/workloads-v2.md`), and the checks that
//! keep one subtree from having two decisions and keep the parser's work bounded.

use std::net::IpAddr;
use std::path::PathBuf;

use resolver::workloads::{
    derived_uid, Address, Mode, WorkloadsErrorKind, ZtunnelMode, MAX_DEPTH, MAX_FILE_BYTES,
    MAX_NODES,
};
use resolver::Workloads;
use testkit::workloads_text::{file, long_address_list, many};

fn err(text: &str) -> String {
    Workloads::parse(text).unwrap_err().to_string()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const INPOD: &str = "\
version: 2
ztunnel:
  cgroup: /zb/ztunnel
  mode: inpod
  zds: /run/zb/ztunnel.sock
dns_capture: true
workloads:
  - name: demo/productpage
    cgroup: /zb/pods/productpage
    address: 10.99.0.2
    mode: ambient
    service_account: bookinfo
    uid: 6f1c0000-0000-4000-8000-000000000001
  - name: reviews
    cgroup: /zb/pods/reviews
    address: auto
    mode: ambient
";

#[test]
fn version_2_in_pod() {
    let w = Workloads::parse(INPOD).unwrap();
    assert_eq!(w.version, 2);
    assert!(w.dns_capture);
    let z = w.ztunnel.as_ref().unwrap();
    assert_eq!(
        z.mode,
        ZtunnelMode::InPod {
            zds: PathBuf::from("/run/zb/ztunnel.sock")
        }
    );
    assert_eq!(z.address, Address::Fixed(vec![]), "optional in in-pod mode");
    let (p, r) = (&w.workloads[0], &w.workloads[1]);
    assert_eq!(p.service_account, "bookinfo");
    assert_eq!(p.uid, "6f1c0000-0000-4000-8000-000000000001");
    assert_eq!(p.zds_namespace_and_name(), ("demo", "productpage"));
    assert_eq!(r.service_account, "default");
    assert_eq!(r.uid, derived_uid("reviews"));
    assert_eq!(r.zds_namespace_and_name(), ("default", "reviews"));
    assert!(w.warnings().is_empty());
    // An address given in in-pod mode is kept.
    let with_address = INPOD.replace("  mode: inpod\n", "  mode: inpod\n  address: 10.99.0.1\n");
    let w = Workloads::parse(&with_address).unwrap();
    assert_eq!(
        w.ztunnel.unwrap().address,
        Address::Fixed(vec![ip("10.99.0.1")])
    );
}

#[test]
fn version_2_node_mode_is_the_default() {
    let text = "version: 2\nztunnel:\n  cgroup: /zb/zt\n  address: 10.99.0.1\n";
    let w = Workloads::parse(text).unwrap();
    assert_eq!(w.ztunnel.as_ref().unwrap().mode, ZtunnelMode::Node);
    assert!(!w.dns_capture);
    let explicit = text.replace("  address", "  mode: node\n  address");
    assert_eq!(Workloads::parse(&explicit).unwrap(), w);
    let no_capture = format!("{text}dns_capture: false\n");
    assert_eq!(Workloads::parse(&no_capture).unwrap(), w);
}

#[test]
fn version_1_files_mean_what_they_meant() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/workloads.yaml");
    let w = Workloads::load(std::path::Path::new(path)).unwrap();
    assert_eq!(w.version, 1);
    assert_eq!(w.ztunnel.as_ref().unwrap().mode, ZtunnelMode::Node);
    assert!(!w.dns_capture);
    for spec in &w.workloads {
        assert_eq!(spec.service_account, "default");
        assert_eq!(spec.uid, derived_uid(&spec.name));
    }
    assert_eq!(
        w.workloads[0].zds_namespace_and_name(),
        ("demo", "productpage")
    );
}

#[test]
fn the_v2_example_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/workloads-v2.yaml");
    let w = Workloads::load(std::path::Path::new(path)).expect("examples/workloads-v2.yaml");
    assert_eq!(w.version, 2);
    assert!(matches!(w.ztunnel.unwrap().mode, ZtunnelMode::InPod { .. }));
}

#[test]
fn derived_uids_are_stable_and_distinct() {
    // The value of the documented derivation (Python's uuid.uuid5 gives the same).
    assert_eq!(
        derived_uid("demo/productpage"),
        "d99a9bd5-b48d-5363-85b1-010215b844a7"
    );
    assert_ne!(derived_uid("demo/a"), derived_uid("demo/b"));
    let a = Workloads::parse(&file(2, "", &[("demo/a", "/a")])).unwrap();
    let b = Workloads::parse(&file(2, "", &[("demo/a", "/a")])).unwrap();
    assert_eq!(a.workloads[0].uid, b.workloads[0].uid);
}

#[test]
fn version_2_refusals_name_the_key_and_line() {
    let e = err("version: 2\nztunnel:\n  cgroup: /zt\n  address: 10.0.0.1\n  zds: /run/z.sock\n");
    assert!(e.contains("ztunnel.zds") && e.contains("line 5"), "{e}");
    let e = err("version: 2\nztunnel:\n  cgroup: /zt\n  mode: inpod\n");
    assert!(e.contains("zds") && e.contains("line 4"), "{e}");
    let e = err("version: 2\nztunnel:\n  cgroup: /zt\n  mode: dedicated\n  zds: /z\n");
    assert!(e.contains("ztunnel.mode") && e.contains("line 4"), "{e}");
    let e = err("version: 2\nztunnel:\n  cgroup: /zt\n");
    assert!(e.contains("address") && e.contains("line 3"), "{e}");
    let e = err("version: 2\nztunnel:\n  cgroup: /zt\n  address: auto\ndns_capture: true\n");
    assert!(e.contains("dns_capture") && e.contains("line 5"), "{e}");
    let e = err("version: 2\ndns_capture: true\n");
    assert!(e.contains("dns_capture"), "{e}");
    let base = file(2, "", &[("demo/a", "/a")]);
    let e = err(&format!("{base}    service_account: \"\"\n"));
    assert!(
        e.contains("workloads[0].service_account") && e.contains("line 7"),
        "{e}"
    );
    let e = err(&format!("{base}    uid: \" \"\n"));
    assert!(
        e.contains("workloads[0].uid") && e.contains("line 7"),
        "{e}"
    );
    let e = err(&format!("{base}    namespace: demo\n"));
    assert!(e.contains("namespace") && e.contains("line 7"), "{e}");
    let e = err(&file(2, "", &[("demo/", "/a")]));
    assert!(
        e.contains("workloads[0].name") && e.contains("line 3"),
        "{e}"
    );
    let e = err(&file(2, "", &[("/a", "/a")]));
    assert!(e.contains("workloads[0].name"), "{e}");
    let e = err("version: 2\nztunnel:\n  cgroup: /zt\n  mode: inpod\n  zds: \"\"\n");
    assert!(e.contains("ztunnel.zds"), "{e}");
    let e = err(&format!(
        "version: 2\nztunnel:\n  cgroup: /zt\n  mode: inpod\n  zds: /{}\n",
        "s".repeat(120)
    ));
    assert!(
        e.contains("ztunnel.zds") && e.contains("Unix socket"),
        "{e}"
    );
    // Two workloads with one uid: ZDS could not tell them apart.
    let two = file(2, "", &[("demo/a", "/a"), ("demo/b", "/b")]);
    let e = err(&two.replace(
        "    mode: ambient\n  - name: demo/b",
        &format!(
            "    mode: ambient\n    uid: {}\n  - name: demo/b",
            derived_uid("demo/b")
        ),
    ));
    assert!(
        e.contains("uid") && e.contains("workloads[0].uid") && e.contains("workloads[1]"),
        "{e}"
    );
}

#[test]
fn version_2_keys_in_a_version_1_file_are_unknown() {
    let e = err("version: 1\nztunnel:\n  cgroup: /zt\n  address: 10.0.0.1\n  mode: node\n");
    assert!(e.contains("ztunnel.mode") && e.contains("line 5"), "{e}");
    let e = err("version: 1\ndns_capture: false\n");
    assert!(e.contains("dns_capture") && e.contains("line 2"), "{e}");
    let e = err(&format!("{}    uid: x\n", file(1, "", &[("a", "/a")])));
    assert!(
        e.contains("workloads[0].uid") && e.contains("version 2"),
        "{e}"
    );
    let e = err(&format!(
        "{}    service_account: x\n",
        file(1, "", &[("a", "/a")])
    ));
    assert!(e.contains("workloads[0].service_account"), "{e}");
    // v1's address stays required.
    let e = err("version: 1\nztunnel:\n  cgroup: /zt\n");
    assert!(e.contains("address"), "{e}");
}

// Issue 15, 5: one cgroup, two spellings.

#[test]
fn two_spellings_of_one_subtree_are_refused() {
    let e = err(&file(1, "", &[("a", "/x/pods/a"), ("b", "/x//pods/a")]));
    assert!(
        e.contains("workloads[1].cgroup")
            && e.contains("workloads[0].cgroup")
            && e.contains("the same subtree")
            && e.contains("line 8")
            && e.contains("line 4"),
        "{e}"
    );
    let zt = "ztunnel:\n  cgroup: /x//zt\n  address: 10.99.0.1\n";
    let e = err(&file(1, zt, &[("a", "/x/zt")]));
    assert!(
        e.contains("ztunnel.cgroup") && e.contains("workloads[0].cgroup"),
        "{e}"
    );
    let e = err(&file(1, "", &[("a", "/x/pods/a/"), ("b", "/x/pods/a")]));
    assert!(e.contains("the same subtree"), "{e}");
    // An exempt subtree spelled another way is one too.
    let e = err(&format!(
        "{}exempt: [\"/x//pods/a/b\"]\n",
        file(1, "", &[("a", "/x/pods/a")])
    ));
    assert!(e.contains("exempt[0]") && e.contains("overlaps"), "{e}");
}

#[test]
fn paths_are_kept_in_one_spelling() {
    let zt = "ztunnel:\n  cgroup: //zb//zt/\n  address: 10.99.0.1\n";
    let w = Workloads::parse(&format!(
        "{}exempt: [/system.slice//kubelet.service/]\n",
        file(1, zt, &[("a", "/zb//pods///a//")])
    ))
    .unwrap();
    assert_eq!(w.ztunnel.unwrap().cgroup, "/zb/zt");
    assert_eq!(w.workloads[0].cgroup, "/zb/pods/a");
    assert_eq!(w.exempt, vec!["/system.slice/kubelet.service".to_string()]);
    let root = Workloads::parse("version: 1\nexempt: [//]\n").unwrap();
    assert_eq!(root.exempt, vec!["/".to_string()]);
    for bad in ["/zb/./a", "/zb/../a", "/zb/a/.."] {
        let e = err(&file(1, "", &[("a", bad)]));
        assert!(
            e.contains("workloads[0].cgroup") && e.contains("line 4") && e.contains("`.`"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn overlaps_are_found_whatever_sorts_between_them() {
    // `!` sorts before `/`: in byte order `/a!x` would sit between `/a` and `/a/b`.
    let e = err(&file(1, "", &[("a", "/a"), ("b", "/a!x"), ("c", "/a/b")]));
    assert!(
        e.contains("workloads[2].cgroup") && e.contains("workloads[0].cgroup"),
        "{e}"
    );
    let e = err(&file(1, "", &[("c", "/a/b/c"), ("b", "/a-b"), ("a", "/")]));
    assert!(
        e.contains("workloads[2].cgroup") && e.contains("overlaps"),
        "{e}"
    );
    Workloads::parse(&file(1, "", &[("a", "/a"), ("b", "/a!x"), ("c", "/ab/c")])).unwrap();
}

#[test]
fn duplicate_names_are_refused() {
    let e = err(&file(
        1,
        "",
        &[("demo/a", "/a"), ("demo/b", "/b"), ("demo/a", "/c")],
    ));
    assert!(
        e.contains("workloads[2].name")
            && e.contains("demo/a")
            && e.contains("workloads[0]")
            && e.contains("line 3"),
        "{e}"
    );
}

#[test]
fn control_characters_are_refused() {
    let e = err(&file(1, "", &[("\"demo/a\\nINFO forged\"", "/a")]));
    assert!(
        e.contains("workloads[0].name") && e.contains("control"),
        "{e}"
    );
    assert!(!e.contains('\n'), "the error quotes it escaped: {e}");
    let e = err(&file(1, "", &[("\"a\\tb\"", "/a")]));
    assert!(e.contains("control"), "{e}");
    // YAML's `\L` is LS, a line break to the YAML parser and to some log readers.
    let e = err(&file(1, "", &[("\"a\\Lb\"", "/a")]));
    assert!(e.contains("control") && !e.contains('\u{2028}'), "{e}");
    let e = err(&file(1, "", &[("a", "\"/a\\nb\"")]));
    assert!(
        e.contains("workloads[0].cgroup") && !e.contains('\n'),
        "{e}"
    );
    let e = err(&format!(
        "{}    uid: \"u\\r\"\n",
        file(2, "", &[("a", "/a")])
    ));
    assert!(e.contains("workloads[0].uid"), "{e}");
}

#[test]
fn addresses_no_pod_can_have_are_refused() {
    for bad in [
        "0.0.0.0",
        "\"::\"",
        "127.0.0.1",
        "127.1.2.3",
        "\"::1\"",
        "224.0.0.1",
        "\"ff02::1\"",
        "255.255.255.255",
        "\"::ffff:127.0.0.1\"",
        "[10.0.0.1, 127.0.0.1]",
    ] {
        let text = file(1, "", &[("a", "/a")]).replace("10.0.0.1\n", &format!("{bad}\n"));
        let e = err(&text);
        assert!(
            e.contains("workloads[0].address") && e.contains("line 5"),
            "{bad}: {e}"
        );
        let zt = format!("version: 1\nztunnel:\n  cgroup: /zt\n  address: {bad}\n");
        let e = err(&zt);
        assert!(e.contains("ztunnel.address"), "{bad}: {e}");
    }
    let ok =
        file(1, "", &[("a", "/a")]).replace("10.0.0.1\n", "[10.0.0.1, \"fd00::1\", 169.254.1.1]\n");
    let w = Workloads::parse(&ok).unwrap();
    assert_eq!(
        w.workloads[0].address,
        Address::Fixed(vec![ip("10.0.0.1"), ip("169.254.1.1"), ip("fd00::1")])
    );
}

#[test]
fn a_byte_order_mark_is_no_content() {
    let text = file(1, "", &[("a", "/a")]);
    let w = Workloads::parse(&text).unwrap();
    assert_eq!(Workloads::parse(&format!("\u{feff}{text}")).unwrap(), w);
    // The YAML parser alone refuses a mark followed by a document start.
    assert_eq!(
        Workloads::parse(&format!("\u{feff}---\n{text}")).unwrap(),
        w
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.yaml");
    std::fs::write(&path, format!("\u{feff}---\n{text}")).unwrap();
    assert_eq!(Workloads::load(&path).unwrap(), w);
}

#[test]
fn ambient_workloads_without_ztunnel_warn() {
    let w = Workloads::parse(&file(1, "", &[("a", "/a")])).unwrap();
    let warnings = w.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("no ztunnel"), "{warnings:?}");
    let zt = "ztunnel:\n  cgroup: /zt\n  address: 10.99.0.1\n";
    assert!(Workloads::parse(&file(1, zt, &[("a", "/a")]))
        .unwrap()
        .warnings()
        .is_empty());
    let none = file(1, "", &[("a", "/a")]).replace("mode: ambient", "mode: none");
    let w = Workloads::parse(&none).unwrap();
    assert_eq!(w.workloads[0].mode, Mode::None);
    assert!(w.warnings().is_empty());
}

// Issue 15, 6: bounded inputs.

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let n = 100_000;
    let flow = format!("version: 1\nexempt: {}{}\n", "[".repeat(n), "]".repeat(n));
    let e = Workloads::parse(&flow).unwrap_err();
    assert!(
        matches!(e.kind, WorkloadsErrorKind::TooDeep { line: 2 }),
        "{e}"
    );
    assert!(e.to_string().contains("line 2"), "{e}");
    let block = format!("version: 1\nexempt:\n{}x\n", "- ".repeat(n));
    let e = Workloads::parse(&block).unwrap_err();
    assert!(
        matches!(e.kind, WorkloadsErrorKind::TooDeep { line: 3 }),
        "{e}"
    );
    // At the limit, the YAML goes to the parser (and is refused for its shape).
    let at_limit = format!(
        "version: 1\nexempt: {}{}\n",
        "[".repeat(MAX_DEPTH - 1),
        "]".repeat(MAX_DEPTH - 1)
    );
    let e = Workloads::parse(&at_limit).unwrap_err();
    assert!(matches!(e.kind, WorkloadsErrorKind::Syntax(_)), "{e}");
}

#[test]
fn a_file_of_too_many_nodes_is_refused_before_parsing() {
    // Within the size limit, but dense: the parser would hold about a hundred times the
    // file's size in events.
    let dense = format!(
        "version: 1\nexempt:\n- /a\n- [{}[]]\n",
        "[],".repeat(MAX_NODES)
    );
    assert!((dense.len() as u64) < MAX_FILE_BYTES);
    let e = Workloads::parse(&dense).unwrap_err();
    assert!(
        matches!(e.kind, WorkloadsErrorKind::TooManyNodes { line: 4 }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "workloads file: more than {MAX_NODES} YAML nodes (a workload takes about ten), \
             the limit, passed at line 4; not parsed"
        )
    );
}

#[test]
fn files_over_the_limit_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MAX_FILE_BYTES + 1).unwrap();
    let e = Workloads::load(&path).unwrap_err();
    assert!(matches!(e.kind, WorkloadsErrorKind::TooLarge), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    let text = format!("version: 1\n#{}\n", "x".repeat(MAX_FILE_BYTES as usize));
    let e = Workloads::parse(&text).unwrap_err();
    assert!(matches!(e.kind, WorkloadsErrorKind::TooLarge), "{e}");
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.yaml");
    std::fs::write(&path, "version: 1\nzombies: []\n").unwrap();
    let e = Workloads::load(&path).unwrap_err().to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("zombies") && e.contains("line 2"),
        "{e}"
    );
    let e = Workloads::load(&dir.path().join("missing.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.yaml"), "{e}");
    std::fs::write(&path, b"version: 1\n\xff\n").unwrap();
    let e = Workloads::load(&path).unwrap_err().to_string();
    assert!(e.contains("w.yaml") && e.contains("UTF-8"), "{e}");
}

#[test]
fn fifty_thousand_workloads() {
    let text = many(50_000);
    let w = Workloads::parse(&text).unwrap();
    assert_eq!(w.workloads.len(), 50_000);
    assert_eq!(w.workloads[49_999].cgroup, "/zb/pods/w49999");
    // One overlap among them is still found, and named.
    let overlapping = text.replace("cgroup: /zb/pods/w31337\n", "cgroup: /zb/pods/w3/w31337\n");
    let e = err(&overlapping);
    assert!(
        e.contains("workloads[31337].cgroup") && e.contains("workloads[3].cgroup"),
        "{e}"
    );
}

/// `workloads` workloads whose `address` is an alias of one anchored list of `addresses`.
fn aliased_addresses(addresses: usize, workloads: usize) -> String {
    let list: Vec<String> = (0..addresses)
        .map(|i| format!("10.{}.{}.{}", i / 62_500, i / 250 % 250 + 1, i % 250 + 1))
        .collect();
    let mut s = format!(
        "version: 1\nworkloads:\n  - {{name: a, cgroup: /a, mode: none, address: &list [{}]}}\n",
        list.join(", ")
    );
    for i in 0..workloads {
        s.push_str(&format!(
            "  - {{name: w{i}, cgroup: /w{i}, mode: none, address: *list}}\n"
        ));
    }
    s
}

#[test]
fn aliases_cannot_multiply_the_work() {
    // 2,000 aliases of 1,000 addresses: 2 million addresses to read from about 130 KB.
    let text = aliased_addresses(1_000, 2_000);
    let e = match Workloads::parse(&text) {
        Ok(w) => panic!("accepted, {} workloads", w.workloads.len()),
        Err(e) => e,
    };
    assert!(matches!(e.kind, WorkloadsErrorKind::Syntax(_)), "{e}");
    assert!(e.to_string().contains("aliases"), "{e}");
    assert!(
        e.to_string().contains("workloads["),
        "the refusal names where: {e}"
    );
    // Aliases that repeat less than the file holds are YAML like any other.
    let w = Workloads::parse(&aliased_addresses(3, 20)).unwrap();
    assert_eq!(w.workloads.len(), 21);
    assert_eq!(w.workloads[20].address, w.workloads[0].address);
}

/// A workload with `n` distinct addresses, IPv6 and IPv4 mixed, and each once more.

#[test]
fn long_address_lists() {
    let w = Workloads::parse(&long_address_list(100_000)).unwrap();
    let Address::Fixed(ips) = &w.workloads[0].address else {
        panic!("fixed")
    };
    assert_eq!(ips.len(), 100_000, "the repeated one once");
    assert!(ips[..50_000].iter().all(|ip| ip.is_ipv4()));
    assert_eq!(ips[0], ip("10.0.1.1"));
    assert_eq!(ips[50_000], ip("fd00::1"));
}
