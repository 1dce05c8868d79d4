//! Import files read fast: CSV lines split into cells, and the evidence JSON of each row
//! (python/kiln/suppress/formats.py), for the rows where that gives what Python's `csv`
//! module and `json.dumps` give. No I/O: Python reads the bytes and hands them in.
//!
//! `split_lines` takes the easy lines only: valid UTF-8, one record a line, no NUL, none
//! blank, none longer than Python's field limit. It stops before the first other line and
//! says where, so Python reads that one with `csv` (which knows every corner) and hands the
//! rest back. What it gives for a line is what `csv.reader` (default dialect: `"` quotes,
//! doubled to escape, not strict) gives for it.

use std::fmt::Write as _;

/// A cell `split_lines` found: its byte range in `Split::text`; `MISSING` for a short row.
pub type Cell = (u32, u32);
/// The cell of a row shorter than the header.
pub const MISSING: Cell = (u32::MAX, u32::MAX);

/// Consecutive lines split into cells, `width` cells a row (row-major).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// How many rows (lines).
    pub rows: usize,
    /// Offset in the data just after the last line taken.
    pub end: usize,
    /// Every cell's text, one after the other.
    pub text: String,
    /// `rows * width` cells; a row's cells past `width` are not kept.
    pub cells: Vec<Cell>,
    /// Per column: every cell is there and has no white space to trim (`str.strip` would
    /// give it back unchanged).
    pub trimmed: Vec<bool>,
}

impl Split {
    /// The text of a cell (None for `MISSING`).
    pub fn cell(&self, row: usize, column: usize, width: usize) -> Option<&str> {
        let cell = self.cells[row * width + column];
        (cell != MISSING).then(|| span(&self.text, cell))
    }
}

/// The text of a cell that is there.
fn span(text: &str, (start, end): Cell) -> &str {
    &text[start as usize..end as usize]
}

/// Whether `c` is white space to Python (`str.isspace`, what `str.strip` removes).
pub const fn is_py_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\x1c'..=' '
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// Whether `text.strip()` in Python is `text`.
fn is_trimmed(text: &str) -> bool {
    let mut chars = text.chars();
    !chars.next().is_some_and(is_py_space) && !chars.next_back().is_some_and(is_py_space)
}

/// Whether `text.strip()` in Python is empty.
fn is_blank(text: &str) -> bool {
    text.chars().all(is_py_space)
}

/// Whether `bytes` is nothing but line-break characters (what `csv` skips after a record's
/// end; anything else there is its "new-line character seen in unquoted field").
fn only_line_breaks(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == b'\n' || b == b'\r')
}

/// The cells of one line (with its `\n`, or the file's last line without one) as
/// `csv.reader` reads them, appended to `text` and `cells`; false, with nothing kept, for a
/// line that is not one whole record (`csv` then reads it): empty, a quoted field left open,
/// or a line break inside an unquoted field.
///
/// `csv`'s states, run a stretch at a time: a field starts (empty, quoted or plain); a quoted
/// one runs to its closing quote (a doubled quote is one quote) and, not strict, any text
/// after it joins the field; a plain one runs to the delimiter or the line's end.
fn split_line(line: &str, delimiter: u8, text: &mut String, cells: &mut Vec<Cell>) -> bool {
    let bytes = line.as_bytes();
    let n = bytes.len();
    if matches!(bytes.first(), None | Some(b'\n' | b'\r')) {
        return false;
    }
    let (text_len, cells_len) = (text.len(), cells.len());
    let mut i = 0; // the start of a field
    let whole = loop {
        let field = text.len();
        let mut save = |text: &String| cells.push((field as u32, text.len() as u32));
        let Some(&c) = bytes.get(i) else {
            save(text); // the line ends after a delimiter: an empty last field
            break true;
        };
        if c == b'\n' || c == b'\r' {
            save(text);
            break only_line_breaks(&bytes[i..]);
        }
        if c == delimiter {
            save(text);
            i += 1;
            continue;
        }
        if c == b'"' {
            let mut from = i + 1;
            let after = loop {
                let Some(q) = memchr::memchr(b'"', &bytes[from..]).map(|q| from + q) else {
                    break None; // open at the line's end: the field goes on to the next line
                };
                text.push_str(&line[from..q]);
                if bytes.get(q + 1) == Some(&b'"') {
                    text.push('"');
                    from = q + 2;
                } else {
                    break Some(q + 1);
                }
            };
            let Some(after) = after else {
                break false;
            };
            match bytes.get(after) {
                None => {
                    save(text);
                    break true;
                }
                Some(&c) if c == delimiter => {
                    save(text);
                    i = after + 1;
                    continue;
                }
                Some(b'\n' | b'\r') => {
                    save(text);
                    break only_line_breaks(&bytes[after..]);
                }
                Some(_) => i = after, // text after the closing quote joins the field
            }
        }
        let rest = &bytes[i..];
        match memchr::memchr3(delimiter, b'\n', b'\r', rest).map(|k| i + k) {
            None => {
                text.push_str(&line[i..]);
                save(text);
                break true;
            }
            Some(end) => {
                text.push_str(&line[i..end]);
                save(text);
                if bytes[end] == delimiter {
                    i = end + 1;
                } else {
                    break only_line_breaks(&bytes[end..]);
                }
            }
        }
    };
    debug_assert!(i <= n);
    if !whole {
        text.truncate(text_len);
        cells.truncate(cells_len);
    }
    whole
}

/// Lines of `data` from `start`, split: at most `max_rows`, stopping before the first line
/// that is not easy (see the module docs). `data` holds whole lines (each ending in `\n`,
/// but the file's last); a line is taken only if its bytes number at most `max_line_bytes`
/// (Python's `csv.field_size_limit()`, so no field can exceed it).
pub fn split_lines(
    data: &[u8],
    start: usize,
    delimiter: u8,
    width: usize,
    max_rows: usize,
    max_line_bytes: usize,
) -> Split {
    let mut out = Split {
        end: start.min(data.len()),
        trimmed: vec![true; width],
        text: String::with_capacity(data.len().saturating_sub(start)),
        cells: Vec::with_capacity(width * max_rows.min(data.len().saturating_sub(start) / 32 + 1)),
        ..Split::default()
    };
    let mut row: Vec<Cell> = Vec::new();
    while out.rows < max_rows && out.end < data.len() {
        let rest = &data[out.end..];
        let len = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        if len > max_line_bytes || u32::try_from(out.text.len() + len).is_err() {
            break;
        }
        let Ok(line) = std::str::from_utf8(&rest[..len]) else {
            break;
        };
        if memchr::memchr(0, line.as_bytes()).is_some() {
            break;
        }
        let base = out.text.len();
        row.clear();
        if !split_line(line, delimiter, &mut out.text, &mut row) {
            break;
        }
        if row.iter().all(|&c| is_blank(span(&out.text, c))) {
            out.text.truncate(base);
            break;
        }
        for column in 0..width {
            let cell = row.get(column).copied().unwrap_or(MISSING);
            if cell == MISSING || !is_trimmed(span(&out.text, cell)) {
                out.trimmed[column] = false;
            }
            out.cells.push(cell);
        }
        out.rows += 1;
        out.end += len;
    }
    out
}

/// One field of the evidence: its name and each row's value (None: left out of that row).
pub enum Field<'a> {
    Text(&'a str, Vec<&'a str>),
    Number(&'a str, Vec<Option<i64>>),
}

impl Field<'_> {
    fn name(&self) -> &str {
        match self {
            Self::Text(name, _) | Self::Number(name, _) => name,
        }
    }
}

/// `s` as `json.dumps` writes a string (ASCII only: `\uXXXX` escapes, surrogate pairs past
/// U+FFFF), appended to `out`.
pub fn push_json_string(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    out.push('"');
    let mut plain = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\' {
            i += 1;
            continue;
        }
        out.push_str(&s[plain..i]);
        let c = s[i..].chars().next().unwrap_or_default();
        i += c.len_utf8();
        plain = i;
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// An evidence text as kept: cut to `max_chars` characters (one fewer and an ellipsis),
/// then as JSON.
fn push_evidence_text(out: &mut String, s: &str, max_chars: usize) {
    if s.len() <= max_chars || s.chars().count() <= max_chars {
        push_json_string(out, s);
        return;
    }
    let cut = s
        .char_indices()
        .nth(max_chars.saturating_sub(1))
        .map_or(s.len(), |(i, _)| i);
    let mut kept = String::with_capacity(cut + 3);
    kept.push_str(&s[..cut]);
    kept.push('\u{2026}');
    push_json_string(out, &kept);
}

/// Each row's evidence as the JSON text `json.dumps(evidence, sort_keys=True)` gives for
/// `{"kind": kind, "line": line, ...fields}`: a text left out when empty and cut to
/// `max_text_chars` characters, a number left out when None. Every field has one value per
/// line.
pub fn evidence_json(
    kind: &str,
    lines: &[i64],
    fields: &[Field<'_>],
    max_text_chars: usize,
) -> Evidence {
    let mut keys: Vec<(&str, Option<&Field<'_>>)> = vec![("kind", None), ("line", None)];
    keys.extend(fields.iter().map(|f| (f.name(), Some(f))));
    keys.sort_by(|a, b| a.0.cmp(b.0));
    let mut heads = Vec::with_capacity(keys.len());
    for (name, _) in &keys {
        let mut head = String::new();
        push_json_string(&mut head, name);
        head.push_str(": ");
        heads.push(head);
    }
    let mut kind_json = String::new();
    push_json_string(&mut kind_json, kind);
    let mut out = Evidence {
        text: String::with_capacity(lines.len() * 64),
        ends: Vec::with_capacity(lines.len()),
    };
    let json = &mut out.text;
    for (row, line) in lines.iter().enumerate() {
        let open = json.len();
        json.push('{');
        for ((name, field), head) in keys.iter().zip(&heads) {
            let start = json.len();
            if start > open + 1 {
                json.push_str(", ");
            }
            json.push_str(head);
            match field {
                None if *name == "kind" => json.push_str(&kind_json),
                None => {
                    let _ = write!(json, "{line}");
                }
                Some(Field::Text(_, values)) if !values[row].is_empty() => {
                    push_evidence_text(json, values[row], max_text_chars);
                }
                Some(Field::Number(_, values)) if values[row].is_some() => {
                    let _ = write!(json, "{}", values[row].unwrap_or_default());
                }
                Some(_) => json.truncate(start),
            }
        }
        json.push('}');
        out.ends.push(json.len());
    }
    out
}

/// Each row's evidence JSON, one after the other in `text`; row `i` ends at `ends[i]`.
#[derive(Debug, Default)]
pub struct Evidence {
    pub text: String,
    pub ends: Vec<usize>,
}

impl Evidence {
    /// Each row's JSON text, in order.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.ends.len()).map(|i| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            &self.text[start..self.ends[i]]
        })
    }
}

/// Whether `kiln.suppress.address.is_normal(text)` holds: a plain ASCII local part
/// (letters, digits, ``!#$%&'*+/=?^_`{|}~.-``), one `@`, and a domain of lower-case labels
/// (`a-z`, `0-9`, `_`, `-` inside), none over 63 characters; 255 characters at most.
pub fn is_normal_address(text: &str) -> bool {
    const LOCAL_EXTRA: &[u8] = b"!#$%&'*+/=?^_`{|}~.-";
    let bytes = text.as_bytes();
    if bytes.len() > 255 {
        return false;
    }
    let Some(at) = bytes.iter().position(|&b| b == b'@') else {
        return false;
    };
    let (local, domain) = (&bytes[..at], &bytes[at + 1..]);
    if local.is_empty()
        || !local
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || LOCAL_EXTRA.contains(b))
    {
        return false;
    }
    domain.split(|&b| b == b'.').all(|label| {
        let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_';
        (1..=63).contains(&label.len())
            && label.first().is_some_and(edge)
            && label.last().is_some_and(edge)
            && label.iter().all(|b| edge(b) || *b == b'-')
    })
}

/// Unix times written as digits (`formats._unix_times_ms`): each text trimmed as Python
/// trims it, empty giving None, else at most 15 ASCII digits, seconds below 10^11 made
/// milliseconds. None for a column with anything else (Python then reads it value by value).
pub fn unix_times_ms<'a>(texts: impl IntoIterator<Item = &'a str>) -> Option<Vec<Option<i64>>> {
    const EXACT_DIGITS: usize = 15;
    const MS_THRESHOLD: i64 = 100_000_000_000;
    let mut out = Vec::new();
    for text in texts {
        let digits = text.trim_matches(is_py_space);
        if digits.is_empty() {
            out.push(None);
            continue;
        }
        if digits.len() > EXACT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value: i64 = digits.parse().ok()?;
        out.push(Some(if value >= MS_THRESHOLD {
            value
        } else {
            value * 1000
        }));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(data: &str, width: usize) -> (Vec<Vec<Option<String>>>, usize) {
        let split = split_lines(data.as_bytes(), 0, b',', width, usize::MAX, 1 << 17);
        let rows = (0..split.rows)
            .map(|r| {
                (0..width)
                    .map(|c| split.cell(r, c, width).map(str::to_owned))
                    .collect()
            })
            .collect();
        (rows, split.end)
    }

    fn cells(row: &[&str]) -> Vec<Option<String>> {
        row.iter().map(|c| Some((*c).to_owned())).collect()
    }

    #[test]
    fn plain_and_quoted_cells_read_as_csv_reads_them() {
        let data = "a,b,c\n\"x,1\",\"say \"\"hi\"\"\",\"q\"tail\r\nlast,,\n";
        let (got, end) = rows(data, 3);
        assert_eq!(end, data.len());
        assert_eq!(
            got,
            vec![
                cells(&["a", "b", "c"]),
                cells(&["x,1", "say \"hi\"", "qtail"]),
                cells(&["last", "", ""]),
            ]
        );
    }

    #[test]
    fn a_short_row_is_padded_and_a_long_one_cut() {
        let (got, _) = rows("a\nb,c,d,e\n", 3);
        assert_eq!(got[0], vec![Some("a".to_owned()), None, None]);
        assert_eq!(got[1], cells(&["b", "c", "d"]));
    }

    #[test]
    fn the_last_line_needs_no_line_break() {
        let (got, end) = rows("a,b\nc,\"d\"", 2);
        assert_eq!(got, vec![cells(&["a", "b"]), cells(&["c", "d"])]);
        assert_eq!(end, 9);
    }

    #[test]
    fn hard_lines_stop_the_split_before_them() {
        for (data, taken) in [
            ("a,b\n\nc,d\n", 4),           // blank line
            ("a,b\n\"open\nquote\"\n", 4), // a quoted line break
            ("a,b\nx\ry,z\n", 4),          // a carriage return inside a field
            ("a,b\n , \n", 4),             // every cell blank
            ("a,b\n\r\n", 4),              // a blank CRLF line
            ("a,b\nx\0y,z\n", 4),          // NUL
            ("a,b\n\u{a0},\u{2003}\n", 4), // Unicode blanks
            ("a,b\r\n\"c\"\r\r\nd", 12),   // all easy
        ] {
            assert_eq!(rows(data, 2).1, taken, "{data:?}");
        }
        let bad_utf8 = b"a,b\n\xff,c\n";
        assert_eq!(split_lines(bad_utf8, 0, b',', 2, 9, 99).end, 4);
        assert_eq!(split_lines(b"abcdef\nx\n", 0, b',', 1, 9, 6).end, 0);
        assert_eq!(split_lines(b"a\nb\nc\n", 2, b',', 1, 1, 9).end, 4);
    }

    #[test]
    fn trimmed_says_which_columns_strip_would_change() {
        let split = split_lines(b"a, b,c\nd,e,\xc2\xa0f\n", 0, b',', 4, 9, 99);
        assert_eq!(split.trimmed, vec![true, false, false, false]);
    }

    #[test]
    fn json_strings_escape_as_json_dumps_does() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\n\u{7f}\u{e9}\u{1f600}\u{1}");
        assert_eq!(out, r#""a\"b\\c\n\u007f\u00e9\ud83d\ude00\u0001""#);
    }

    #[test]
    fn evidence_is_sorted_and_leaves_out_empty_fields() {
        let long = "\u{e9}".repeat(501);
        let fields = [
            Field::Text("reason", vec!["no such user", "", &long]),
            Field::Text("code", vec!["550", "", ""]),
            Field::Number("expires_ms", vec![None, Some(5), None]),
        ];
        let evidence = evidence_json("bounces", &[2, 3, 4], &fields, 500);
        let json: Vec<&str> = evidence.rows().collect();
        assert_eq!(
            json[0],
            r#"{"code": "550", "kind": "bounces", "line": 2, "reason": "no such user"}"#
        );
        assert_eq!(
            json[1],
            r#"{"expires_ms": 5, "kind": "bounces", "line": 3}"#
        );
        let cut = format!(
            r#"{{"kind": "bounces", "line": 4, "reason": "{}\u2026"}}"#,
            r"\u00e9".repeat(499)
        );
        assert_eq!(json[2], cut);
    }

    #[test]
    fn normal_addresses_are_told_apart() {
        for good in ["a@b", "A.b+c@x-y.example_1.com", "a@b.c"] {
            assert!(is_normal_address(good), "{good}");
        }
        for bad in [
            "", "@b", "a@", "a@B", "a@-b", "a@b-", "a@b..c", "a b@c", "a@b@c", "\u{e9}@b",
        ] {
            assert!(!is_normal_address(bad), "{bad}");
        }
        assert!(is_normal_address(&format!("a@{}", "b".repeat(63))));
        assert!(!is_normal_address(&format!("a@{}", "b".repeat(64))));
    }

    #[test]
    fn unix_times_read_digits_only() {
        assert_eq!(
            unix_times_ms([" 1700000000", "", "1700000000123"]),
            Some(vec![Some(1_700_000_000_000), None, Some(1_700_000_000_123)])
        );
        assert_eq!(unix_times_ms(["1.5"]), None);
        assert_eq!(unix_times_ms(["1234567890123456"]), None);
    }
}
