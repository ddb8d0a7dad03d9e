//! The file as serde reads it. Every value is checked as it is read, so a refusal carries the
//! key's path and its line and column from the YAML parser. The values that the checks across
//! the file point back to are read as [`At`], which keeps the order they were read in: reading
//! the text again and stopping at that value gives its line (see [`line_of`]).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

use super::{ipv4_first, limits, shown, Address, Mode};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub version: At<Version>,
    #[serde(default)]
    pub ztunnel: Option<RawZtunnel>,
    #[serde(default)]
    pub dns_capture: Option<At<bool>>,
    #[serde(default)]
    pub workloads: Vec<RawWorkload>,
    #[serde(default)]
    pub exempt: Vec<At<Cgroup>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZtunnel {
    pub cgroup: At<Cgroup>,
    // Optional here because in-pod mode does without; node mode's need is checked after.
    #[serde(default)]
    pub address: Option<RawAddress>,
    #[serde(default)]
    pub mode: Option<At<ZtunnelModeName>>,
    #[serde(default)]
    pub zds: Option<At<ZdsPath>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub name: At<Name>,
    pub cgroup: At<Cgroup>,
    pub address: RawAddress,
    pub mode: Mode,
    #[serde(default)]
    pub service_account: Option<At<Text>>,
    #[serde(default)]
    pub uid: Option<At<Text>>,
}

/// Reads the text into the raw file.
pub(super) fn read(text: &str) -> Result<RawFile, serde_norway::Error> {
    READ.set(0);
    STOP_AT.set(None);
    start_budget(text);
    serde_norway::from_str(text)
}

/// The line of the `ordinal`-th [`At`] value of the text. Called only to word a refusal, so
/// reading the text once more costs nothing that matters.
pub(super) fn line_of(text: &str, ordinal: usize) -> Option<usize> {
    READ.set(0);
    STOP_AT.set(Some(ordinal));
    start_budget(text);
    let result = serde_norway::from_str::<RawFile>(text);
    STOP_AT.set(None);
    match result {
        Err(e) if e.to_string().contains(STOP) => e.location().map(|l| l.line()),
        _ => None,
    }
}

thread_local! {
    /// How many [`At`] values the current read has taken.
    static READ: Cell<usize> = const { Cell::new(0) };
    /// Where [`line_of`]'s read stops.
    static STOP_AT: Cell<Option<usize>> = const { Cell::new(None) };
    /// How many more values the current read may take (see [`start_budget`]).
    static BUDGET: Cell<usize> = const { Cell::new(0) };
}

/// A YAML alias (`*a`) hands serde the whole anchored value again wherever it is written, so
/// a file well within the size and depth limits can make the reader visit, parse and keep
/// far more values than the file holds: an anchored list of addresses aliased from every
/// workload costs the product of the two. The values kept ([`At`] values and addresses) are
/// counted: each, written out, takes at least one byte of the file, so a file without aliases
/// never reaches as many as it has bytes. That is the budget; aliases may repeat what they
/// like within it.
fn start_budget(text: &str) {
    BUDGET.set(text.len());
}

/// Counts one value read; an error once the read has taken more values than the file has
/// bytes.
fn spend<E: de::Error>() -> Result<(), E> {
    match BUDGET.get().checked_sub(1) {
        Some(left) => {
            BUDGET.set(left);
            Ok(())
        }
        None => Err(E::custom(
            "YAML aliases (`*name`) repeat more values than the file has bytes; \
             write the values out",
        )),
    }
}

/// The message of the error that stops [`line_of`]'s read; the parser adds the line to it.
const STOP: &str = "\u{0}stop";

/// A value and the order in which it was read.
pub(super) struct At<T> {
    pub value: T,
    pub ordinal: usize,
}

/// A value read from one YAML scalar and checked on the way.
pub(super) trait Scalar: Sized {
    const EXPECTING: &'static str;
    /// Calls the `deserialize_*` method that hands the visitor this type's scalar.
    fn request<'de, D: Deserializer<'de>, V: Visitor<'de>>(
        d: D,
        v: V,
    ) -> Result<V::Value, D::Error> {
        d.deserialize_str(v)
    }
    fn from_str(_: &str) -> Result<Self, String> {
        Err(format!("expected {}", Self::EXPECTING))
    }
    fn from_u64(_: u64) -> Result<Self, String> {
        Err(format!("expected {}", Self::EXPECTING))
    }
    fn from_bool(_: bool) -> Result<Self, String> {
        Err(format!("expected {}", Self::EXPECTING))
    }
}

impl<'de, T: Scalar> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::request(d, AtVisitor(PhantomData))
    }
}

struct AtVisitor<T>(PhantomData<T>);

// The checks run inside the visitor, not after it returns: only an error raised there is
// given the value's own line and column by the parser.
impl<T: Scalar> Visitor<'_> for AtVisitor<T> {
    type Value = At<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<At<T>, E> {
        located(T::from_str(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<At<T>, E> {
        located(T::from_u64(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<At<T>, E> {
        match u64::try_from(v) {
            Ok(v) => located(T::from_u64(v)),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<At<T>, E> {
        located(T::from_bool(v))
    }
}

fn located<T, E: de::Error>(value: Result<T, String>) -> Result<At<T>, E> {
    spend()?;
    let value = value.map_err(E::custom)?;
    let ordinal = READ.get();
    READ.set(ordinal + 1);
    if STOP_AT.get() == Some(ordinal) {
        return Err(E::custom(STOP));
    }
    Ok(At { value, ordinal })
}

/// `version`: 1 or 2.
pub(super) struct Version(pub u32);

impl Scalar for Version {
    const EXPECTING: &'static str = "a version number";
    fn request<'de, D: Deserializer<'de>, V: Visitor<'de>>(
        d: D,
        v: V,
    ) -> Result<V::Value, D::Error> {
        d.deserialize_u64(v)
    }
    fn from_u64(v: u64) -> Result<Self, String> {
        match v {
            1 | 2 => Ok(Version(v as u32)),
            _ => Err(format!(
                "{v} is not a known version; the known ones are 1 and 2"
            )),
        }
    }
}

impl Scalar for bool {
    const EXPECTING: &'static str = "true or false";
    fn request<'de, D: Deserializer<'de>, V: Visitor<'de>>(
        d: D,
        v: V,
    ) -> Result<V::Value, D::Error> {
        d.deserialize_bool(v)
    }
    fn from_bool(v: bool) -> Result<Self, String> {
        Ok(v)
    }
}

/// A cgroup subtree: as written, and normalised (see [`normalise_cgroup`]).
pub(super) struct Cgroup {
    pub path: String,
    pub written: String,
}

impl Scalar for Cgroup {
    const EXPECTING: &'static str = "an absolute cgroup path";
    fn from_str(v: &str) -> Result<Self, String> {
        Ok(Cgroup {
            path: normalise_cgroup(v)?,
            written: v.to_string(),
        })
    }
}

/// The one spelling of a subtree, the one the kernel writes in `/proc/PID/cgroup`: `//`
/// collapsed, no trailing `/`. Two spellings of one directory would otherwise escape the
/// overlap check and leave which decision wins to the order of lookups. `.` and `..` are
/// refused rather than resolved: the kernel never writes them, so a path with them is a
/// mistake.
pub(super) fn normalise_cgroup(v: &str) -> Result<String, String> {
    if !v.starts_with('/') {
        return Err(format!(
            "cgroup `{}` must be an absolute path (start with `/`)",
            shown(v)
        ));
    }
    if v.chars().any(forges_lines) {
        return Err(format!(
            "cgroup `{}` has a control character, which would forge log lines",
            shown(v)
        ));
    }
    let mut path = String::with_capacity(v.len());
    for part in v.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(format!(
                "cgroup `{v}` has a `{part}` component; write the path without `.` and `..`"
            ));
        }
        path.push('/');
        path.push_str(part);
    }
    if path.is_empty() {
        path.push('/');
    }
    Ok(path)
}

/// A control character, or a line break the YAML parser knows: either, logged, could make a
/// line look like two.
fn forges_lines(c: char) -> bool {
    c.is_control() || limits::is_break(c)
}

/// A workload's `name`: not blank, no control characters (the name is logged, and a newline
/// in it would forge a log line).
pub(super) struct Name(pub String);

impl Scalar for Name {
    const EXPECTING: &'static str = "a workload name";
    fn from_str(v: &str) -> Result<Self, String> {
        if v.trim().is_empty() {
            return Err("name is empty".to_string());
        }
        if v.chars().any(forges_lines) {
            return Err(format!(
                "name `{}` has a control character, which would forge log lines",
                shown(v)
            ));
        }
        Ok(Name(v.to_string()))
    }
}

/// `service_account` and `uid`: not blank (leave the key out for the default), no control
/// characters.
pub(super) struct Text(pub String);

impl Scalar for Text {
    const EXPECTING: &'static str = "a string";
    fn from_str(v: &str) -> Result<Self, String> {
        if v.trim().is_empty() {
            return Err("empty; leave the key out for the default".to_string());
        }
        if v.chars().any(forges_lines) {
            return Err(format!(
                "`{}` has a control character, which would forge log lines",
                shown(v)
            ));
        }
        Ok(Text(v.to_string()))
    }
}

/// `ztunnel.mode`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ZtunnelModeName {
    Node,
    InPod,
}

impl Scalar for ZtunnelModeName {
    const EXPECTING: &'static str = "`node` or `inpod`";
    fn from_str(v: &str) -> Result<Self, String> {
        match v {
            "node" => Ok(ZtunnelModeName::Node),
            "inpod" => Ok(ZtunnelModeName::InPod),
            _ => Err(format!(
                "unknown mode `{}`, expected `node` or `inpod`",
                shown(v)
            )),
        }
    }
}

/// `ztunnel.zds`: a path a Unix socket can be bound to.
pub(super) struct ZdsPath(pub PathBuf);

/// The room for a path in `sockaddr_un`, less its terminating NUL: a longer path cannot be
/// bound, and saying so here beats a bind error at start.
const SUN_PATH_MAX: usize = 107;

impl Scalar for ZdsPath {
    const EXPECTING: &'static str = "the path of the ZDS socket";
    fn from_str(v: &str) -> Result<Self, String> {
        if v.trim().is_empty() {
            return Err("empty; in-pod mode needs the path of the ZDS socket".to_string());
        }
        if v.chars().any(forges_lines) {
            return Err(format!("`{}` has a control character", shown(v)));
        }
        if v.len() > SUN_PATH_MAX {
            return Err(format!(
                "`{v}` is longer than a Unix socket path can be ({SUN_PATH_MAX} bytes)"
            ));
        }
        Ok(ZdsPath(PathBuf::from(v)))
    }
}

/// An `address`: one, a list, or `auto`.
pub(super) struct RawAddress(pub Address);

impl<'de> Deserialize<'de> for RawAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AddressVisitor)
    }
}

struct AddressVisitor;

impl<'de> Visitor<'de> for AddressVisitor {
    type Value = RawAddress;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an IP address, a list of them, or `auto`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawAddress, E> {
        if v == "auto" {
            return Ok(RawAddress(Address::Auto));
        }
        spend()?;
        let ip = check_ip(v).map_err(E::custom)?;
        Ok(RawAddress(Address::Fixed(vec![ip])))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawAddress, A::Error> {
        let mut ips = Vec::new();
        while let Some(item) = seq.next_element::<String>()? {
            spend()?;
            ips.push(check_ip(&item).map_err(de::Error::custom)?);
        }
        if ips.is_empty() {
            return Err(de::Error::custom("an empty address list"));
        }
        Ok(RawAddress(Address::Fixed(ipv4_first(ips))))
    }
}

/// An address a pod or ztunnel can have: one that parses, and is none of those that no
/// interface of theirs ever has.
fn check_ip(v: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = v
        .trim()
        .parse()
        .map_err(|_| format!("address `{}` does not parse as an IP address", shown(v)))?;
    let canonical = ip.to_canonical();
    let why = if canonical.is_unspecified() {
        "unspecified"
    } else if canonical.is_loopback() {
        "a loopback address"
    } else if canonical.is_multicast() {
        "a multicast address"
    } else if matches!(canonical, IpAddr::V4(v4) if v4.is_broadcast()) {
        "the broadcast address"
    } else {
        return Ok(ip);
    };
    Err(format!(
        "address `{ip}` is {why}, never a pod's or ztunnel's"
    ))
}
