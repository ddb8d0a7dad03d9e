//! The Rust mirrors in `layout.rs` against the C structs, as the built object's BTF describes
//! them (read with `bpftool btf dump`): sizes and every field's name and offset.

use std::mem::{offset_of, size_of};
use std::process::Command;

use programmer::layout::{self, CgroupInfo, ConnTuple, ConnectRecord, OrigDst, PodAddr, Settings};
use programmer::object;

/// (name, byte offset) of each member, and the size, of a BTF struct.
fn btf_struct(types: &[serde_json::Value], name: &str) -> (u64, Vec<(String, u64)>) {
    let t = types
        .iter()
        .find(|t| t["kind"] == "STRUCT" && t["name"] == name)
        .unwrap_or_else(|| panic!("struct {name} not in the object's BTF"));
    let members = t["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let bits = m["bits_offset"].as_u64().unwrap();
            assert_eq!(bits % 8, 0, "{name}.{}: a bit field", m["name"]);
            (m["name"].as_str().unwrap().to_string(), bits / 8)
        })
        .collect();
    (t["size"].as_u64().unwrap(), members)
}

/// A struct's name, size and (field, offset) list.
type StructLayout = (&'static str, usize, Vec<(String, u64)>);

fn owned(fields: &[(&str, usize)]) -> Vec<(String, u64)> {
    fields
        .iter()
        .map(|(n, o)| (n.to_string(), *o as u64))
        .collect()
}

/// The object's BTF types, as `bpftool btf dump` lists them.
fn btf_types() -> Vec<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["-j", "btf", "dump", "file", object::OBJECT_PATH])
        .output()
        .expect("bpftool runs (Debian package `bpftool`)");
    assert!(
        out.status.success(),
        "bpftool btf dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    dump["types"].as_array().unwrap().clone()
}

/// What member `member` of the map definition `map` (libbpf's `__uint`/`__type` in `.maps`)
/// points to: an ARRAY whose `nr_elems` is the number for `__uint`, the type for `__type`.
fn map_member<'a>(
    types: &'a [serde_json::Value],
    map: &str,
    member: &str,
) -> &'a serde_json::Value {
    let by_id = |id: &serde_json::Value| {
        types
            .iter()
            .find(|t| t["id"] == *id)
            .unwrap_or_else(|| panic!("BTF type {id} not found"))
    };
    let var = types
        .iter()
        .find(|t| t["kind"] == "VAR" && t["name"] == map)
        .unwrap_or_else(|| panic!("map {map} not in the object's BTF"));
    let def = by_id(&var["type_id"]);
    let m = def["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == member)
        .unwrap_or_else(|| panic!("{map} declares no {member}"));
    let ptr = by_id(&m["type_id"]);
    assert_eq!(ptr["kind"], "PTR", "{map}.{member}");
    by_id(&ptr["type_id"])
}

#[test]
fn rust_mirrors_match_the_objects_btf() {
    let types = btf_types();
    let types = types.as_slice();

    let cases: Vec<StructLayout> = vec![
        (
            "cgroup_info",
            size_of::<CgroupInfo>(),
            owned(&[
                ("flags", offset_of!(CgroupInfo, flags)),
                ("addr4", offset_of!(CgroupInfo, addr4)),
                ("addr6", offset_of!(CgroupInfo, addr6)),
            ]),
        ),
        (
            "settings",
            size_of::<Settings>(),
            owned(&[
                ("flags", offset_of!(Settings, flags)),
                ("outbound_port", offset_of!(Settings, outbound_port)),
                ("inbound_port", offset_of!(Settings, inbound_port)),
                ("levels", offset_of!(Settings, levels)),
                ("ztunnel_count4", offset_of!(Settings, ztunnel_count4)),
                ("ztunnel_count6", offset_of!(Settings, ztunnel_count6)),
                ("reserved", offset_of!(Settings, reserved)),
                ("generation", offset_of!(Settings, generation)),
                ("ztunnel_addr4", offset_of!(Settings, ztunnel_addr4)),
                ("ztunnel_addr6", offset_of!(Settings, ztunnel_addr6)),
            ]),
        ),
        (
            "pod_addr",
            size_of::<PodAddr>(),
            owned(&[("addr", offset_of!(PodAddr, addr))]),
        ),
        (
            "orig_dst",
            size_of::<OrigDst>(),
            owned(&[
                ("addr", offset_of!(OrigDst, addr)),
                ("port", offset_of!(OrigDst, port)),
                ("family", offset_of!(OrigDst, family)),
            ]),
        ),
        (
            "conn_tuple",
            size_of::<ConnTuple>(),
            owned(&[
                ("src", offset_of!(ConnTuple, src)),
                ("dst", offset_of!(ConnTuple, dst)),
                ("sport", offset_of!(ConnTuple, sport)),
                ("dport", offset_of!(ConnTuple, dport)),
            ]),
        ),
        (
            "connect_record",
            size_of::<ConnectRecord>(),
            owned(&[
                ("armed", offset_of!(ConnectRecord, armed)),
                ("flags", offset_of!(ConnectRecord, flags)),
                ("dst", offset_of!(ConnectRecord, dst)),
                ("reserved", offset_of!(ConnectRecord, reserved)),
                ("cached_cgroup", offset_of!(ConnectRecord, cached_cgroup)),
                (
                    "cached_generation",
                    offset_of!(ConnectRecord, cached_generation),
                ),
                ("reserved2", offset_of!(ConnectRecord, reserved2)),
                ("cached_info", offset_of!(ConnectRecord, cached_info)),
            ]),
        ),
    ];
    for (name, rust_size, rust_fields) in cases {
        let (c_size, c_fields) = btf_struct(types, name);
        assert_eq!(c_size, rust_size as u64, "size of struct {name}");
        assert_eq!(c_fields, rust_fields, "fields of struct {name}");
    }
}

#[test]
fn maps_of_the_object_are_the_ones_layout_names_with_their_key_and_value_sizes() {
    let specs = object::map_specs(object::OBJECT).unwrap();
    let mut names: Vec<&str> = specs.keys().map(String::as_str).collect();
    names.sort();
    let mut want = layout::MAPS.to_vec();
    want.sort();
    assert_eq!(names, want);
    let kv = |name: &str| {
        (
            specs[name].key_size as usize,
            specs[name].value_size as usize,
        )
    };
    assert_eq!(kv(layout::CGROUP_INFO_MAP), (8, size_of::<CgroupInfo>()));
    assert_eq!(kv(layout::SETTINGS_MAP), (4, size_of::<Settings>()));
    assert_eq!(kv(layout::POD_ADDR_MAP), (size_of::<PodAddr>(), 4));
    // Thread storage: the key is a pidfd in map operations; the value a connect_record.
    assert_eq!(
        kv(layout::ORIG_DST_BY_TASK_MAP),
        (4, size_of::<ConnectRecord>())
    );
    assert_eq!(specs[layout::ORIG_DST_BY_TASK_MAP].map_type, 29); // BPF_MAP_TYPE_TASK_STORAGE
    assert_eq!(
        kv(layout::ORIG_DST_BY_TUPLE_MAP),
        (size_of::<ConnTuple>(), size_of::<OrigDst>())
    );
    assert_eq!(specs[layout::ORIG_DST_BY_TUPLE_MAP].map_type, 9); // BPF_MAP_TYPE_LRU_HASH
    assert_eq!(
        specs[layout::ORIG_DST_BY_TUPLE_MAP].max_entries,
        layout::TUPLE_RECORDS
    );
    // Preallocated (no BPF_F_NO_PREALLOC: an update in sock_ops allocates nothing), one LRU
    // list shared by the CPUs (no BPF_F_NO_COMMON_LRU).
    assert_eq!(specs[layout::ORIG_DST_BY_TUPLE_MAP].map_flags, 0);
    assert_eq!(kv(layout::COUNTERS_MAP), (4, 8));
    // One counter slot per name the reader decodes (ZB_C_MAX).
    assert_eq!(
        specs[layout::COUNTERS_MAP].max_entries as usize,
        layout::COUNTER_NAMES.len()
    );
    assert_eq!(
        specs[layout::CGROUP_INFO_MAP].max_entries,
        layout::DEFAULT_MAX_ENTRIES
    );
}

/// `orig_dst_by_tuple` as the C declares it: the kernel's LRU hash, keyed by `struct
/// conn_tuple` with `struct orig_dst` as value (the types [`ConnTuple`] and [`OrigDst`]
/// mirror, checked above), holding [`layout::TUPLE_RECORDS`].
#[test]
fn orig_dst_by_tuple_is_an_lru_hash_of_conn_tuple_to_orig_dst() {
    let types = btf_types();
    let map = layout::ORIG_DST_BY_TUPLE_MAP;
    let uint = |member| {
        map_member(&types, map, member)["nr_elems"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(uint("type"), 9); // BPF_MAP_TYPE_LRU_HASH
    assert_eq!(uint("max_entries"), u64::from(layout::TUPLE_RECORDS));
    let key = map_member(&types, map, "key");
    assert_eq!(
        (&key["kind"], &key["name"]),
        (&"STRUCT".into(), &"conn_tuple".into())
    );
    let value = map_member(&types, map, "value");
    assert_eq!(
        (&value["kind"], &value["name"]),
        (&"STRUCT".into(), &"orig_dst".into())
    );
}
