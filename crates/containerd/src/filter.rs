//! containerd's Walk filters over snapshots: `a==b,c!=d` is a
//! conjunction, the list of filters a disjunction; `~=` matches a regular
//! expression; a field alone asks for its presence. Fields: `name`,
//! `parent`, `kind`, `labels.<key>` (a key may be quoted:
//! `labels."containerd.io/gc.root"`).

use sharedloop_core::{Error, Result};

use crate::snapshots::SnapInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Present,
    Eq,
    Ne,
    Match,
}

#[derive(Debug)]
struct Clause {
    field: Vec<String>,
    op: Op,
    value: String,
    re: Option<regex::Regex>,
}

#[derive(Debug)]
pub struct Filter {
    clauses: Vec<Clause>,
}

fn unquote(s: &str) -> Result<String> {
    let s = s.trim();
    for q in ['"', '\'', '/'] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return Ok(s[1..s.len() - 1].replace(&format!("\\{q}"), &q.to_string()));
        }
    }
    Ok(s.to_owned())
}

/// Splits at `sep` outside quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quote: Option<char> = None;
    let mut prev = '\0';
    for c in s.chars() {
        match quote {
            Some(q) if c == q && prev != '\\' => quote = None,
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == sep => {
                out.push(String::new());
                prev = c;
                continue;
            }
            _ => {}
        }
        out.last_mut().unwrap().push(c);
        prev = c;
    }
    out
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter> {
        let bad = |why: &str| Error::Invalid(format!("filter {s:?}: {why}"));
        let mut clauses = Vec::new();
        for part in split_outside_quotes(s, ',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad("empty clause"));
            }
            // The operator is the first one outside quotes.
            let (mut sel, mut op, mut value) = (part.to_owned(), Op::Present, String::new());
            let mut quote: Option<char> = None;
            let b: Vec<char> = part.chars().collect();
            for i in 0..b.len() {
                let c = b[i];
                match quote {
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None if c == '"' || c == '\'' => quote = Some(c),
                    None if i + 1 < b.len() && b[i + 1] == '=' && matches!(c, '=' | '!' | '~') => {
                        sel = b[..i].iter().collect();
                        op = match c {
                            '=' => Op::Eq,
                            '!' => Op::Ne,
                            _ => Op::Match,
                        };
                        value = unquote(&b[i + 2..].iter().collect::<String>())?;
                        break;
                    }
                    None => {}
                }
            }
            let field: Vec<String> =
                split_outside_quotes(sel.trim(), '.').iter().map(|f| unquote(f)).collect::<Result<_>>()?;
            if field.is_empty() || field.iter().any(String::is_empty) {
                return Err(bad("empty field name"));
            }
            let re = match op {
                Op::Match => Some(regex::Regex::new(&value).map_err(|e| bad(&format!("bad regular expression: {e}")))?),
                _ => None,
            };
            clauses.push(Clause { field, op, value, re });
        }
        Ok(Filter { clauses })
    }

    pub fn matches(&self, s: &SnapInfo) -> bool {
        self.clauses.iter().all(|c| {
            let v: Option<&str> = match c.field.first().map(String::as_str) {
                Some("name") if c.field.len() == 1 => Some(&s.name),
                Some("parent") if c.field.len() == 1 => Some(&s.parent),
                Some("kind") if c.field.len() == 1 => Some(s.kind.name()),
                Some("labels") if c.field.len() == 2 => s.labels.get(&c.field[1]).map(String::as_str),
                Some("labels") if c.field.len() == 1 => (!s.labels.is_empty()).then_some(""),
                _ => None,
            };
            match c.op {
                Op::Present => v.is_some(),
                Op::Eq => v == Some(c.value.as_str()),
                Op::Ne => v != Some(c.value.as_str()),
                Op::Match => v.is_some_and(|v| c.re.as_ref().expect("compiled").is_match(v)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshots::tests::snap;
    use crate::snapshots::SnapKind;

    fn m(f: &str, s: &SnapInfo) -> bool {
        Filter::parse(f).unwrap().matches(s)
    }

    #[test]
    fn filters_follow_containerds_syntax() {
        let a = snap("default/3/sha256:ab", SnapKind::Committed, "p", &[("containerd.io/gc.root", "x"), ("l1", "v1")]);
        assert!(m("kind==committed", &a));
        assert!(!m("kind==active", &a));
        assert!(m("kind!=active", &a));
        assert!(m("parent==p,kind==committed", &a));
        assert!(!m("parent==p,kind==view", &a));
        assert!(m("labels.l1==v1", &a));
        assert!(m("labels.l1", &a));
        assert!(!m("labels.l2", &a));
        assert!(m(r#"labels."containerd.io/gc.root""#, &a));
        assert!(m(r#"labels."containerd.io/gc.root"==x"#, &a));
        assert!(m("name~=sha256:a", &a));
        assert!(!m("name~=^sha", &a));
        assert!(m(r#"name=="default/3/sha256:ab""#, &a));
        assert!(m("labels.l1~=^v[0-9]$", &a));
    }

    #[test]
    fn bad_filters_are_errors_naming_the_filter() {
        for f in ["kind==a,", "name~=(", ".x==y"] {
            let e = Filter::parse(f).unwrap_err().to_string();
            assert!(e.contains(f), "{e}");
        }
    }
}
