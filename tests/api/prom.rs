//! Reading `/metrics` by series: a sample is found by its name and its set of labels, whatever order
//! the exporter prints the labels in.

use std::collections::BTreeMap;

/// One sample line of the Prometheus text format: name, labels and value.
fn parse_line(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    // A quoted value with `\"`, `\\` and `\n` escapes.
                    if chars.next().map(|(_, q)| q) != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()? {
                            (_, '\\') => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            (_, '"') => break,
                            (_, other) => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
        rest = &inner[end?..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// The value of the sample `name` whose labels are exactly `labels` (in any order), if exported.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    text.lines()
        .filter_map(parse_line)
        .find(|(n, l, _)| *n == name && *l == want)
        .map(|(_, _, v)| v)
}

#[test]
fn samples_are_found_whatever_the_label_order() {
    let text = "# HELP x_total X.\n# TYPE x_total counter\nx_total{b=\"2\",a=\"1\"} 7\nx_total{a=\"1\",b=\"3\"} 1\ny 4.5\nz{v=\"a\\\"b\"} 2\n";
    assert_eq!(
        sample(text, "x_total", &[("a", "1"), ("b", "2")]),
        Some(7.0)
    );
    assert_eq!(
        sample(text, "x_total", &[("b", "3"), ("a", "1")]),
        Some(1.0)
    );
    assert_eq!(
        sample(text, "x_total", &[("a", "1")]),
        None,
        "labels must match exactly"
    );
    assert_eq!(sample(text, "y", &[]), Some(4.5));
    assert_eq!(sample(text, "z", &[("v", "a\"b")]), Some(2.0));
    assert_eq!(sample(text, "x", &[]), None);
}
