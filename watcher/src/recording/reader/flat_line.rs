//! The process records' lines read without serde: a flat JSON object, as the writer writes
//! them (no whitespace), of the `exec`, `fork` and `exit` fields: unsigned integers, strings
//! without escapes or control characters, and `ips`' array of such strings. These are most of
//! a recording's lines, and a general JSON parse spends more on each than the rest of reading
//! it.
//!
//! Any other line (another type, a field not of those records or given twice, `null`,
//! whitespace, an escape, a number that is not a plain unsigned integer of its field's size,
//! anything after the object) is declined (`None`) and parsed as JSON, which reads or refuses
//! it as it always did. What is read here is what that parse reads from the same line.

use std::borrow::Cow;

use super::{RawRecord, RecordType, Text};

/// The line's fields, or `None` when the line is not such a flat object.
pub(super) fn read<O>(line: &str) -> Option<RawRecord<'_, O>> {
    let mut scan = Scanner { text: line, at: 0 };
    let mut raw = RawRecord::empty();
    scan.expect(b'{')?;
    loop {
        let key = scan.key()?;
        scan.expect(b':')?;
        match key {
            "ts" => set(&mut raw.ts, scan.unsigned()?)?,
            "type" => {
                let kind = match scan.string()? {
                    "exec" => RecordType::Exec,
                    "fork" => RecordType::Fork,
                    "exit" => RecordType::Exit,
                    _ => return None,
                };
                set(&mut raw.kind, kind)?
            }
            "pid" => set(&mut raw.pid, scan.unsigned_u32()?)?,
            "tgid" => set(&mut raw.tgid, scan.unsigned_u32()?)?,
            "cgroup" => set(&mut raw.cgroup, Text(Cow::Borrowed(scan.string()?)))?,
            "cgroup_id" => set(&mut raw.cgroup_id, scan.unsigned()?)?,
            "netns" => set(&mut raw.netns, scan.unsigned()?)?,
            "ips" => set(&mut raw.ips, scan.strings()?)?,
            "comm" => set(&mut raw.comm, Text(Cow::Borrowed(scan.string()?)))?,
            "parent_pid" => set(&mut raw.parent_pid, scan.unsigned_u32()?)?,
            "parent_tgid" => set(&mut raw.parent_tgid, scan.unsigned_u32()?)?,
            "child_pid" => set(&mut raw.child_pid, scan.unsigned_u32()?)?,
            "child_tgid" => set(&mut raw.child_tgid, scan.unsigned_u32()?)?,
            "exit_code" => set(&mut raw.exit_code, scan.unsigned_u32()?)?,
            _ => return None,
        }
        match scan.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    (scan.at == line.len()).then_some(raw)
}

/// Sets a field read once; a field given twice is declined (the JSON parse refuses it).
fn set<T>(field: &mut Option<T>, value: T) -> Option<()> {
    if field.is_some() {
        return None;
    }
    *field = Some(value);
    Some(())
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn next(&mut self) -> Option<u8> {
        let byte = *self.text.as_bytes().get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// A string without escapes or control characters, borrowed from the line.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let rest = &self.text.as_bytes()[self.at..];
        let len = memchr::memchr(b'"', rest)?;
        // Checked whole, without stopping early, so that the compiler checks many at once.
        let plain = rest[..len]
            .iter()
            .fold(true, |plain, &b| plain & (b >= 0x20) & (b != b'\\'));
        if !plain {
            return None;
        }
        // Both ends are at ASCII bytes of a `str`: character boundaries.
        let value = &self.text[self.at..self.at + len];
        self.at += len + 1;
        Some(value)
    }

    /// A field's name: as [`Scanner::string`], for the short strings that names are (a search
    /// for the closing quote costs more than the name).
    fn key(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let bytes = self.text.as_bytes();
        let start = self.at;
        loop {
            match *bytes.get(self.at)? {
                b'"' => break,
                b'\\' => return None,
                b if b < 0x20 => return None,
                _ => self.at += 1,
            }
        }
        let name = &self.text[start..self.at];
        self.at += 1;
        Some(name)
    }

    /// `[]` or `["a","b"]` of such strings.
    fn strings(&mut self) -> Option<Vec<Text<'a>>> {
        self.expect(b'[')?;
        let mut texts = Vec::new();
        if self.text.as_bytes().get(self.at) == Some(&b']') {
            self.at += 1;
            return Some(texts);
        }
        loop {
            texts.push(Text(Cow::Borrowed(self.string()?)));
            match self.next()? {
                b',' => continue,
                b']' => return Some(texts),
                _ => return None,
            }
        }
    }

    /// A JSON unsigned integer that fits a `u64`: digits, no leading zero. (A sign, fraction
    /// or exponent is not a digit, and declines the line where the `,` or `}` is expected.)
    fn unsigned(&mut self) -> Option<u64> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let mut value: u64 = 0;
        while let Some(&b) = bytes.get(self.at).filter(|b| b.is_ascii_digit()) {
            value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (digits > 1 && bytes[start] == b'0') {
            return None;
        }
        Some(value)
    }

    fn unsigned_u32(&mut self) -> Option<u32> {
        u32::try_from(self.unsigned()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{convert, Converted, RawRecord};
    use super::read;
    use crate::event::Record;

    /// What a parsed line gives: its `ts`, whether it is a second header, and its record or
    /// the error converting it.
    fn outcome(raw: RawRecord<()>) -> (Option<u64>, bool, Result<Record, String>) {
        let ts = raw.ts;
        let header = raw.format.is_some();
        let record = match convert(raw, 7, &mut super::super::FactsReading::default()) {
            Ok(Converted::Record(record)) => Ok(record),
            Ok(Converted::Kube { .. }) => panic!("a kube record read flat"),
            Err(err) => Err(err.to_string()),
        };
        (ts, header, record)
    }

    const READ: &[&str] = &[
        r#"{"ts":1483430,"type":"fork","parent_pid":1,"parent_tgid":1,"child_pid":6,"child_tgid":6}"#,
        r#"{"ts":1486931,"type":"exit","pid":9,"tgid":9,"exit_code":0}"#,
        r#"{"ts":3,"type":"exec","pid":437,"tgid":437,"comm":"app","cgroup":"/kubepods.slice/a.scope","cgroup_id":1809}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"netns":4026531840,"ips":["10.0.0.1","fd00::1"],"comm":"é","cgroup":"/","cgroup_id":1}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"ips":[]}"#,
        r#"{"type":"exec","ts":18446744073709551615,"tgid":4294967295,"pid":0}"#,
        // Read, and refused alike after: a field missing, a bad address, cgroup without id.
        r#"{"ts":3,"type":"exec","pid":1}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"ips":["10.0.0.300"]}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"cgroup":"/a"}"#,
        r#"{"ts":3,"pid":1}"#,
        r#"{"type":"fork"}"#,
    ];

    const DECLINED: &[&str] = &[
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"comm":"a\"b"}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"comm":"a\u0062"}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"comm":null}"#,
        r#"{"ts":3, "type":"exec","pid":1,"tgid":1}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1} "#,
        r#" {"ts":3,"type":"exec","pid":1,"tgid":1}"#,
        r#"{"ts":03,"type":"exec","pid":1,"tgid":1}"#,
        r#"{"ts":-3,"type":"exec","pid":1,"tgid":1}"#,
        r#"{"ts":3.0,"type":"exec","pid":1,"tgid":1}"#,
        r#"{"ts":3e2,"type":"exec","pid":1,"tgid":1}"#,
        r#"{"ts":18446744073709551616,"type":"exec","pid":1,"tgid":1}"#,
        r#"{"ts":3,"type":"exec","pid":4294967296,"tgid":1}"#,
        r#"{"ts":3,"type":"exec","pid":1,"pid":1,"tgid":1}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"other":1}"#,
        r#"{"ts":3,"type":"lost"}"#,
        r#"{"ts":3,"type":"scan","processes":[]}"#,
        r#"{"ts":3,"type":"nope"}"#,
        r#"{"format":"zbridge-events","ts":3}"#,
        r#"{"ts":3,"type":"exec","pid":"1","tgid":1}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"ips":["10.0.0.1",]}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,"ips":"10.0.0.1"}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1}}"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1"#,
        r#"{"ts":3,"type":"exec","pid":1,"tgid":1,}"#,
        r#"{}"#,
        r#"{"t\u0073":3,"type":"exec","pid":1,"tgid":1}"#,
        "{\"ts\n\":3,\"type\":\"exec\",\"pid\":1,\"tgid\":1}",
        "{\"ts\":3,\"type\":\"exec\",\"pid\":1,\"tgid\":1,\"comm\":\"a\tb\"}",
    ];

    #[test]
    fn lines_read_flat_read_as_the_json_parse_reads_them() {
        for line in READ {
            let flat = read::<()>(line).unwrap_or_else(|| panic!("declined: {line}"));
            let json: RawRecord<()> = serde_json::from_str(line).expect(line);
            assert_eq!(outcome(flat), outcome(json), "{line}");
        }
    }

    #[test]
    fn other_lines_are_left_to_the_json_parse() {
        for line in DECLINED {
            assert!(read::<()>(line).is_none(), "read: {line}");
        }
    }
}
