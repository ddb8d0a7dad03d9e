//! Bounds on what the parser is handed, checked before it runs: a file no larger than
//! [`MAX_FILE_BYTES`], no deeper than [`MAX_DEPTH`] and with at most [`MAX_NODES`] nodes. The
//! YAML parser builds the whole event list before serde's own recursion limit applies: its
//! cost grows faster than linearly with nesting, and its memory with the number of nodes (a
//! file of nothing but `[],` takes many times its size), so such a file must be refused
//! before it reaches the parser.

use std::io::Read;

/// The largest workloads file read: far above what any node's workloads take, and small enough
/// to hold in memory. A larger file is refused without being read to its end.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The deepest nesting accepted, counted as open block levels (indentation steps and `-`
/// entries) plus open flow brackets. A real file nests a handful of levels.
pub const MAX_DEPTH: usize = 64;

/// The most nodes accepted (collections, scalars, aliases, block entries: an over-count of
/// the parser's events). A workload takes about ten, so this allows some 100,000 workloads,
/// beyond the map's default capacity; the parser's memory for the densest file within it is
/// in BENCHMARKS.md, "Workloads file bounds".
pub const MAX_NODES: usize = 1_000_000;

/// Which bound a file goes beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beyond {
    /// [`MAX_DEPTH`].
    Depth,
    /// [`MAX_NODES`].
    Nodes,
}

/// Reads at most [`MAX_FILE_BYTES`] of `reader`; `Ok(None)` when there is more.
pub fn read_bounded(reader: impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    reader.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// The first line (1-based) where the file goes beyond a bound, and which, if it does.
///
/// A single pass that follows the YAML scanner as far as depth needs: block collections (by
/// indentation, `-`/`?` entries and `key:`), flow brackets, and where brackets are only text:
/// quoted, plain and block scalars (also when they go on over several lines) and comments.
/// Following the scanner's rules rather than guessing matters: a scan that took a line for
/// text where the parser sees structure would let deep nesting through.
pub fn beyond_bounds(text: &str) -> Option<(Beyond, usize)> {
    let mut scan = Scan::default();
    let line = lines(text).position(|line| scan.line(line))? + 1;
    let beyond = if scan.deep() {
        Beyond::Depth
    } else {
        Beyond::Nodes
    };
    Some((beyond, line))
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
    /// Columns of the open block collections, strictly increasing: the YAML scanner's
    /// indentation levels.
    block: Vec<usize>,
    /// Open flow brackets (`[`, `{`), across lines.
    flow: usize,
    /// Inside a quoted scalar that goes on to the next line.
    quote: Option<u8>,
    /// Inside a block scalar (`|`, `>`): the least indentation of its lines, and the
    /// indentation its first line set.
    block_scalar: Option<(usize, Option<usize>)>,
    /// A plain scalar in block context is open at the end of the last line: a line indented
    /// at least this much goes on with it, as text.
    plain_open: Option<usize>,
    /// In flow context, the last line ended where a node may start (a line break is only
    /// white space there).
    flow_expect: bool,
    /// Nodes begun so far.
    nodes: usize,
}

impl Scan {
    fn deep(&self) -> bool {
        self.block.len() + self.flow > MAX_DEPTH
    }

    /// Beyond a bound: too deep, or too many nodes.
    fn beyond(&self) -> bool {
        self.deep() || self.nodes > MAX_NODES
    }

    /// Scans one line; true when the file goes beyond a bound (too deep, too many nodes).
    fn line(&mut self, line: &str) -> bool {
        let b = line.as_bytes();
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let blank = indent >= b.len();
        if let Some((least, first)) = self.block_scalar {
            let needed = first.unwrap_or(least);
            if blank || indent >= needed {
                if !blank && first.is_none() {
                    self.block_scalar = Some((least, Some(indent)));
                }
                return false;
            }
            self.block_scalar = None;
        }
        let mut i = 0;
        let mut expect_node = true;
        // Where the current node began (its properties included): a key's column is where
        // its mapping is.
        let mut node: Option<usize> = None;
        let mut in_plain = false;
        if self.quote.is_some() {
            // Inside a quoted scalar: no structure until it closes.
        } else if self.flow > 0 {
            expect_node = self.flow_expect;
            in_plain = !expect_node;
        } else {
            if blank {
                return false;
            }
            let marker = indent == 0
                && (line.starts_with("---") || line.starts_with("..."))
                && b.get(3).is_none_or(|c| *c == b' ' || *c == b'\t');
            match self.plain_open {
                Some(_) if b[indent] == b'#' => {
                    // A comment line ends a plain scalar.
                    self.plain_open = None;
                    return false;
                }
                Some(least) if indent >= least && !marker => {
                    // The plain scalar goes on: this line is its text.
                    expect_node = false;
                    in_plain = true;
                    i = indent;
                }
                _ if b[indent] == b'#' => return false,
                _ => {
                    self.plain_open = None;
                    if marker {
                        self.block.clear();
                        i = 3;
                    } else {
                        while self.block.last().is_some_and(|&top| top > indent) {
                            self.block.pop();
                        }
                        i = indent;
                    }
                }
            }
        }
        while i < b.len() {
            let c = b[i];
            if let Some(q) = self.quote {
                i = self.in_quote(b, i, q);
                expect_node = false;
                in_plain = false;
                continue;
            }
            let ws_before = i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t';
            let next = b.get(i + 1).copied();
            let blank_after = matches!(next, None | Some(b' ' | b'\t'));
            match c {
                b' ' | b'\t' => {}
                b'#' if ws_before || expect_node => {
                    // A comment, to the line's end; it ends a plain scalar.
                    in_plain = false;
                    break;
                }
                b'[' | b'{' if expect_node || self.flow > 0 => {
                    if self.flow == 0 {
                        node.get_or_insert(i);
                    }
                    self.nodes += 1;
                    self.flow += 1;
                    if self.beyond() {
                        return true;
                    }
                    expect_node = true;
                    in_plain = false;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    expect_node = false;
                    in_plain = false;
                }
                b',' if self.flow > 0 => {
                    expect_node = true;
                    in_plain = false;
                }
                b'"' | b'\'' if expect_node => {
                    node.get_or_insert(i);
                    self.nodes += 1;
                    self.quote = Some(c);
                    i = self.in_quote(b, i + 1, c);
                    expect_node = false;
                    in_plain = false;
                    continue;
                }
                b'-' | b'?' if expect_node && blank_after && self.flow == 0 => {
                    // A block sequence (or complex key) at this column.
                    self.nodes += 1;
                    self.push(i);
                    if self.beyond() {
                        return true;
                    }
                    node = None;
                }
                b':' if blank_after
                    || (self.flow > 0
                        && matches!(next, Some(b',' | b'[' | b']' | b'{' | b'}'))) =>
                {
                    // What came before was a key: in block context, its mapping is open.
                    if self.flow == 0 {
                        if let Some(col) = node.take() {
                            self.push(col);
                            if self.beyond() {
                                return true;
                            }
                        }
                    }
                    expect_node = true;
                    in_plain = false;
                }
                b'|' | b'>' if expect_node && self.flow == 0 => {
                    self.nodes += 1;
                    if self.beyond() {
                        return true;
                    }
                    let least = self.block.last().map_or(0, |top| top + 1);
                    self.block_scalar = Some((least, None));
                    return false;
                }
                b'&' | b'*' if expect_node => {
                    // An anchor (the node follows) or an alias. Its name ends where the
                    // parser's does, not at the next blank: in `[*a]` the bracket closes.
                    node.get_or_insert(i);
                    self.nodes += 1;
                    i += 1;
                    while i < b.len() && is_name_byte(b[i]) {
                        i += 1;
                    }
                    continue;
                }
                b'!' if expect_node => {
                    // A tag; the node follows. In `[!t,[` the second bracket opens.
                    node.get_or_insert(i);
                    i = tag_end(b, i);
                    continue;
                }
                _ => {
                    // Plain text: brackets and quotes inside it are text, until `: ` (or, in
                    // flow, one of `,[]{}`) ends it.
                    if expect_node {
                        node.get_or_insert(i);
                        self.nodes += 1;
                    }
                    expect_node = false;
                    in_plain = true;
                }
            }
            i += 1;
        }
        if self.quote.is_none() {
            if self.flow > 0 {
                self.flow_expect = expect_node;
            } else if in_plain {
                self.plain_open = Some(self.block.last().map_or(0, |top| top + 1));
            }
        }
        self.beyond()
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

    /// Opens a block collection at `column`, closing the deeper ones.
    fn push(&mut self, column: usize) {
        while self.block.last().is_some_and(|&top| top > column) {
            self.block.pop();
        }
        if self.block.last() != Some(&column) {
            self.block.push(column);
        }
    }
}

/// A byte of an anchor's or alias's name, as the YAML scanner reads it.
fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Where the tag starting at `b[i]` (`!`) ends, as the YAML scanner reads it: a verbatim tag
/// `!<...>` at its `>`; a shorthand (`!`, `!!str`, `!e!x%21`) at the first byte that is no
/// URI byte of a shorthand, so that a flow indicator after it is structure again.
fn tag_end(b: &[u8], mut i: usize) -> usize {
    i += 1;
    if b.get(i) == Some(&b'<') {
        while i < b.len() && b[i] != b'>' {
            i += 1;
        }
        return (i + 1).min(b.len());
    }
    while i < b.len() && (is_name_byte(b[i]) || b";/?:@&=+$.%!~*'()".contains(&b[i])) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn too_deep(text: &str) -> Option<usize> {
        match beyond_bounds(text) {
            Some((Beyond::Depth, line)) => Some(line),
            Some((Beyond::Nodes, line)) => panic!("too many nodes at line {line}"),
            None => None,
        }
    }

    fn depth_ok(text: &str) -> bool {
        too_deep(text).is_none()
    }

    #[test]
    fn many_nodes_are_refused_at_the_line_that_goes_beyond() {
        // Dense flow nodes, the parser's dearest input per byte: refused where the count
        // passes the bound, on the line it is on.
        let dense = format!(
            "a: 1
b: [{}]
",
            "[],".repeat(MAX_NODES)
        );
        assert_eq!(beyond_bounds(&dense), Some((Beyond::Nodes, 2)));
        let scalars = format!(
            "a: [{}]
",
            "x,".repeat(MAX_NODES + 1)
        );
        assert_eq!(beyond_bounds(&scalars), Some((Beyond::Nodes, 1)));
        let entries = "- x\n".repeat(MAX_NODES / 2 + 1);
        assert_eq!(
            beyond_bounds(&entries).map(|(b, _)| b),
            Some(Beyond::Nodes),
            "block entries and their scalars"
        );
        // Text is not nodes: a long scalar of brackets is one.
        let text = format!("a: \"{}\"\n", "[],".repeat(MAX_NODES));
        assert_eq!(beyond_bounds(&text), None);
    }

    #[test]
    fn a_file_of_many_workloads_stays_within_the_node_bound() {
        let mut s = String::from("version: 1\nworkloads:\n");
        for i in 0..65_536 {
            s.push_str(&format!(
                "  - name: demo/w{i}\n    cgroup: /zb/w{i}\n    address: 10.0.{}.{}\n    mode: ambient\n",
                i / 256,
                i % 256
            ));
        }
        assert_eq!(beyond_bounds(&s), None);
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
        assert!(depth_ok(&dashes(MAX_DEPTH)));
        assert!(!depth_ok(&dashes(MAX_DEPTH + 1)));
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
        // Plain text over several lines, in block and in flow context.
        assert!(depth_ok(&format!("a: x\n  {deep}\n   \"{deep}\nb: 1\n")));
        assert!(depth_ok(&format!("a:\n  x\n   {deep}\n")));
        assert!(depth_ok("a: [x\n y, z]\nb: 1\n"));
        assert!(depth_ok(&format!("a: # {deep}\n  b\n")));
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
        // A plain scalar goes on over more indented lines, whatever they hold, and ends at
        // the first line indented no more than its mapping: there the nesting counts.
        assert!(!depth_ok(&format!("a: x\n  \"y\n{deep}")));
        assert!(!depth_ok(&format!("a: x\n  'y\n{deep}")));
        assert!(!depth_ok(&format!(
            "- - key: x\n  - {}\n",
            "[".repeat(MAX_DEPTH + 1)
        )));
        // In flow context a line break is a blank: the next line goes on with a plain
        // scalar, and a quote there is text, so the brackets after it count.
        assert!(!depth_ok(&format!(
            "a: [ x\n \"{}\" ]\n",
            "[".repeat(MAX_DEPTH + 1)
        )));
        assert!(!depth_ok(&format!(
            "a: [ x,\n \"y\",\n {}\n",
            "[".repeat(MAX_DEPTH + 1)
        )));
    }

    #[test]
    fn anchors_aliases_and_tags_end_where_the_parser_ends_them() {
        // An alias closes its bracket: a valid file of many such lines is not deep.
        let aliases = format!("a: &x 1\nb:\n{}", "- {k: *x}\n".repeat(MAX_DEPTH * 2));
        assert!(depth_ok(&aliases));
        assert!(depth_ok(&format!("a: [&y b, *y]\n{aliases}")));
        // A bracket after a tag (and its comma) opens: the nesting counts.
        let tagged = |tag: &str| {
            format!(
                "a: {}{}\n",
                format!("[{tag},").repeat(MAX_DEPTH + 1),
                "]".repeat(MAX_DEPTH + 1)
            )
        };
        for tag in ["!t", "!", "!!str", "!e!x%21", "!<tag:x,y[]>"] {
            assert!(!depth_ok(&tagged(tag)), "{tag}");
        }
        assert!(!depth_ok(&format!(
            "a: {}\n",
            "{k: &n [".repeat(MAX_DEPTH + 1)
        )));
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
