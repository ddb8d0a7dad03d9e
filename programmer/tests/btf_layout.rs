//! The Rust mirrors in `layout.rs` against the C structs, as the built object's BTF describes
//! them (read with `bpftool btf dump`): sizes and every field's name and offset.

use std::mem::{offset_of, size_of};
use std::process::Command;

use programmer::layout::{
    self, CgroupInfo, ConnTuple, ConnectRecord, OrigDst, PodAddr, Settings, TupleSet, TupleSlot,
};
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

#[test]
fn rust_mirrors_match_the_objects_btf() {
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
    let types = dump["types"].as_array().unwrap();

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
        (
            "tuple_slot",
            size_of::<TupleSlot>(),
            owned(&[
                ("seq", offset_of!(TupleSlot, seq)),
                ("tuple", offset_of!(TupleSlot, tuple)),
                ("dst", offset_of!(TupleSlot, dst)),
                ("evictions", offset_of!(TupleSlot, evictions)),
            ]),
        ),
        (
            "tuple_set",
            size_of::<TupleSet>(),
            owned(&[("way", offset_of!(TupleSet, way))]),
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
        (4, size_of::<TupleSet>())
    );
    assert_eq!(specs[layout::ORIG_DST_BY_TUPLE_MAP].map_type, 2); // BPF_MAP_TYPE_ARRAY
    assert_eq!(
        specs[layout::ORIG_DST_BY_TUPLE_MAP].max_entries,
        layout::TUPLE_SETS
    );
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

/// The LRU variant (`object::TUPLE_LRU_OBJECT`) differs from the
/// shipped object in `orig_dst_by_tuple` alone: the kernel's LRU hash keyed by the tuple with
/// the original destination as value, as many records as the table has slots.
#[test]
fn the_tuple_lru_variant_differs_in_orig_dst_by_tuple_alone() {
    let variant = object::TUPLE_LRU_OBJECT;
    let mut shipped = object::map_specs(object::OBJECT).unwrap();
    let mut lru = object::map_specs(variant).unwrap();
    let table = lru.remove(layout::ORIG_DST_BY_TUPLE_MAP).unwrap();
    shipped.remove(layout::ORIG_DST_BY_TUPLE_MAP).unwrap();
    assert_eq!(lru, shipped);
    assert_eq!(table.map_type, 9); // BPF_MAP_TYPE_LRU_HASH
    assert_eq!(table.key_size as usize, size_of::<ConnTuple>());
    assert_eq!(table.value_size as usize, size_of::<OrigDst>());
    assert_eq!(
        table.max_entries,
        layout::TUPLE_SETS * layout::TUPLE_WAYS as u32
    );
    assert_eq!(table.map_flags, 0);
}
