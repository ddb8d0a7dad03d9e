//! Bounds on what the parser is handed, checked before it runs: a file no larger than
//! [`MAX_FILE_BYTES`] and no deeper than [`MAX_DEPTH`]. The YAML parser builds the whole event
//! list before serde's own recursion limit applies, and its cost grows faster than linearly
//! with nesting, so a deep file must be refused before it reaches the parser.

use std::io::Read;

/// The largest workloads file read: far above what any node's workloads take, and small enough
/// to hold in memory. A larger file is refused without being read to its end.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The deepest nesting accepted, counted as open block levels (indentation steps and `-`
/// entries) plus open flow brackets. A real file nests a handful of levels.
pub const MAX_DEPTH: usize = 64;

/// Reads at most [`MAX_FILE_BYTES`] of `reader`; `Ok(None)` when there is more.
pub fn read_bounded(reader: impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    reader.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// The first line (1-based) where the nesting goes deeper than [`MAX_DEPTH`], if any.
///
/// A single pass over the text that follows YAML's structure only as far as depth needs:
/// indentation, `-`/`?` entries, flow brackets, and the places where brackets are text
/// (quoted scalars, plain scalars, comments, block scalars). Where it cannot tell, it counts a
/// level too many rather than one too few, so a deep file never slips through.
pub fn too_deep(text: &str) -> Option<usize> {
    let mut scan = Scan::default();
    lines(text).position(|line| scan.line(line)).map(|i| i + 1)
}

/// The lines of `text`, split where the YAML parser splits them: not only at `\n` and `\r\n`
/// but also at a lone `\r`, NEL, LS and PS. Splitting at fewer would let a file hide its
/// structure on what the scan takes for one line of text.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.char_indices().find(|&(_, c)| is_break(c)) {
            None => {
                rest = None;
                Some(text)
            }
            Some((i, c)) => {
                let mut next = i + c.len_utf8();
                if c == '\r' && text[next..].starts_with('\n') {
                    next += 1;
                }
                rest = Some(&text[next..]);
                Some(&text[..i])
            }
        }
    })
}

/// A line break for the YAML parser.
pub(super) fn is_break(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

#[derive(Default)]
struct Scan {
    /// Columns of the open block nodes, strictly increasing.
    block: Vec<usize>,
    /// Open flow brackets (`[`, `{`), across lines.
    flow: usize,
    /// Inside a quoted scalar that goes on to the next line.
    quote: Option<u8>,
    /// Inside a block scalar (`|`, `>`): its lines are indented deeper than this column.
    block_scalar: Option<usize>,
}

impl Scan {
    fn deep(&self) -> bool {
        self.block.len() + self.flow > MAX_DEPTH
    }

    /// Scans one line; true when it goes too deep.
    fn line(&mut self, line: &str) -> bool {
        let b = line.as_bytes();
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        if let Some(parent) = self.block_scalar {
            if indent >= b.len() || indent > parent {
                return false;
            }
            self.block_scalar = None;
        }
        let mut i = 0;
        let mut expect_node = true;
        // The column of the `-`/`?` just read, when nothing has followed it yet.
        let mut entry: Option<usize> = None;
        if self.quote.is_none() && self.flow == 0 {
            if indent >= b.len() || b[indent] == b'#' {
                return false;
            }
            if indent == 0 && (line.starts_with("---") || line.starts_with("...")) {
                self.block.clear();
                i = 3;
            } else {
                self.push(indent);
                i = indent;
            }
        }
        while i < b.len() {
            let c = b[i];
            if let Some(q) = self.quote {
                i = self.in_quote(b, i, q);
                expect_node = false;
                continue;
            }
            let ws_before = i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t';
            let space_after = i + 1 >= b.len() || b[i + 1] == b' ' || b[i + 1] == b'\t';
            match c {
                b' ' | b'\t' => {}
                b'#' if ws_before => return self.deep(),
                b'[' | b'{' if expect_node || self.flow > 0 => {
                    self.flow += 1;
                    if self.deep() {
                        return true;
                    }
                    expect_node = true;
                    entry = None;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    expect_node = false;
                }
                b',' if self.flow > 0 => expect_node = true,
                b'"' | b'\'' if expect_node => {
                    self.quote = Some(c);
                    i = self.in_quote(b, i + 1, c);
                    expect_node = false;
                    entry = None;
                    continue;
                }
                b'-' | b'?' if expect_node && space_after && self.flow == 0 => {
                    entry = Some(i);
                    // The entry's content is a level of its own, at the column it starts.
                    let content = i + 1 + b[i + 1..].iter().take_while(|&&c| c == b' ').count();
                    if content < b.len() && b[content] != b'#' {
                        self.push(content);
                        if self.deep() {
                            return true;
                        }
                    }
                }
                b':' if space_after || (self.flow > 0 && expect_node) => {
                    expect_node = true;
                    entry = None;
                }
                b':' if self.flow > 0 && matches!(b.get(i + 1), Some(b',' | b']' | b'}')) => {
                    expect_node = true;
                }
                b'|' | b'>' if expect_node && self.flow == 0 => {
                    self.block_scalar = Some(entry.unwrap_or_else(|| self.top()));
                    return self.deep();
                }
                b'&' | b'!' | b'*' if expect_node => {
                    // An anchor, tag or alias: a token up to the next blank; the node follows.
                    while i < b.len() && b[i] != b' ' && b[i] != b'\t' {
                        i += 1;
                    }
                    continue;
                }
                _ => {
                    // Plain text: brackets and quotes inside it are text, until `: ` (or, in
                    // flow, one of `,[]{}`) ends it.
                    expect_node = false;
                    entry = None;
                }
            }
            i += 1;
        }
        self.deep()
    }

    /// Consumes a quoted scalar from `i`; returns where scanning goes on (the line's end when
    /// the quote stays open).
    fn in_quote(&mut self, b: &[u8], mut i: usize, q: u8) -> usize {
        while i < b.len() {
            match b[i] {
                b'\\' if q == b'"' => i += 2,
                b'\'' if q == b'\'' && b.get(i + 1) == Some(&b'\'') => i += 2,
                c if c == q => {
                    self.quote = None;
                    return i + 1;
                }
                _ => i += 1,
            }
        }
        self.quote = Some(q);
        b.len()
    }

    /// Opens a block level at `column`, closing the deeper ones.
    fn push(&mut self, column: usize) {
        while self.block.last().is_some_and(|&top| top > column) {
            self.block.pop();
        }
        if self.block.last() != Some(&column) {
            self.block.push(column);
        }
    }

    fn top(&self) -> usize {
        self.block.last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str) -> bool {
        too_deep(text).is_none()
    }

    #[test]
    fn real_files_are_shallow() {
        let mut s = String::from("version: 2\nworkloads:\n");
        for _ in 0..3 {
            s.push_str("  - name: demo/x\n    cgroup: /zb/x\n    address: [10.0.0.1, \"fd00::1\"]\n    mode: ambient\n");
        }
        s.push_str("exempt:\n- /a\n- /b # [[[[\n");
        assert!(depth_ok(&s));
    }

    #[test]
    fn flow_and_block_nesting_are_counted() {
        let flow = |n: usize| format!("a: {}{}\n", "[".repeat(n), "]".repeat(n));
        assert!(depth_ok(&flow(MAX_DEPTH - 1)));
        assert_eq!(too_deep(&format!("x: 1\n{}", flow(MAX_DEPTH))), Some(2));
        let dashes = |n: usize| format!("a:\n{}x\n", "- ".repeat(n));
        assert!(depth_ok(&dashes(MAX_DEPTH - 2)));
        assert!(!depth_ok(&dashes(MAX_DEPTH)));
        let mut indented = String::new();
        for d in 0..=MAX_DEPTH {
            indented.push_str(&format!("{}k{d}:\n", " ".repeat(d)));
        }
        assert_eq!(too_deep(&indented), Some(MAX_DEPTH + 1));
        // Across lines, and after an anchor.
        let multi = format!("a: &x\n{}\n", "[\n".repeat(MAX_DEPTH + 1));
        assert!(!depth_ok(&multi));
    }

    #[test]
    fn brackets_in_text_are_not_nesting() {
        let deep = "[".repeat(MAX_DEPTH * 2);
        assert!(depth_ok(&format!("a: \"{deep}\"\n")));
        assert!(depth_ok(&format!("a: '{deep}'' {deep}'\n")));
        assert!(depth_ok(&format!("a: x{deep}\n")));
        assert!(depth_ok(&format!("a: x # {deep}\n")));
        assert!(depth_ok(&format!("a: |\n  {deep}\n   {deep}\nb: 1\n")));
        assert!(depth_ok(&format!("- |\n {deep}\n- >-\n  {deep}\n")));
        assert!(depth_ok(&format!("a: \"x\n  {deep}\"\n")));
    }

    #[test]
    fn text_that_only_looks_like_a_quote_hides_no_nesting() {
        // `a"b` is plain text, not the start of a quoted scalar that would hide what follows.
        let deep = format!(
            "c: {}{}\n",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(!depth_ok(&format!("a: x\"y\n{deep}")));
        assert!(!depth_ok(&format!("a: it's\n{deep}")));
        // A block scalar ends where the indentation does.
        assert!(!depth_ok(&format!("a: |\n  text\n{deep}")));
    }

    #[test]
    fn every_line_break_of_yaml_is_one() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        for br in ["\n", "\r\n", "\r", "\u{85}", "\u{2028}", "\u{2029}"] {
            let text = format!("a: x{br}b: y{br}c: {deep}{br}");
            assert_eq!(too_deep(&text), Some(3), "{br:?}");
        }
        let lines: Vec<&str> = lines("a\r\nb\rc\n\nd").collect();
        assert_eq!(lines, ["a", "b", "c", "", "d"]);
    }

    #[test]
    fn bounded_read() {
        let small = vec![b'x'; 10];
        assert_eq!(read_bounded(&small[..]).unwrap(), Some(small.clone()));
        let exact = vec![b'x'; MAX_FILE_BYTES as usize];
        assert!(read_bounded(&exact[..]).unwrap().is_some());
        let over = std::io::repeat(b'x');
        assert_eq!(read_bounded(over).unwrap(), None, "stops at the limit");
    }
}
