//! Label selectors (`app=web,tier in (a,b),!canary`) and field selectors
//! (`spec.nodeName=node-1,status.phase!=Failed`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector;

use crate::validation::{label_key_problem, label_value_problem};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

impl Requirement {
    fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        let v = get(&self.key);
        let has = |v: &str| self.values.iter().any(|x| x == v);
        match self.op {
            Op::Eq | Op::In => v.is_some_and(has),
            Op::NotEq | Op::NotIn => v.is_none_or(|v| !has(v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
        }
    }
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_with(|k| labels.get(k).map(String::as_str))
    }

    /// Matches labels looked up by `get` (for label stores other than a map).
    pub fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.requirements.iter().all(|r| r.matches(&get))
    }

    /// Parses the string form used in `?labelSelector=`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(s)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_term(term)?);
        }
        Ok(Self { requirements })
    }

    /// From the structured form in workload specs.
    pub fn from_k8s(sel: &K8sLabelSelector) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            requirements.push(Requirement {
                key: k.clone(),
                op: Op::Eq,
                values: vec![v.clone()],
            });
        }
        for e in sel.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => return Err(format!("unknown label selector operator {other:?}")),
            };
            let needs_values = matches!(op, Op::In | Op::NotIn);
            if needs_values == values.is_empty() {
                return Err(format!(
                    "operator {} {} values",
                    e.operator,
                    if needs_values { "needs" } else { "takes no" }
                ));
            }
            requirements.push(Requirement {
                key: e.key.clone(),
                op,
                values,
            });
        }
        Ok(Self { requirements })
    }
}

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced ')' in selector {s:?}"));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in selector {s:?}"));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn check_key(key: &str) -> Result<(), String> {
    match label_key_problem(key) {
        Some(p) => Err(format!("invalid label key {key:?}: {p}")),
        None => Ok(()),
    }
}

fn check_value(v: &str) -> Result<(), String> {
    match label_value_problem(v) {
        Some(p) => Err(format!("invalid label value {v:?}: {p}")),
        None => Ok(()),
    }
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement {
            key: key.into(),
            op: Op::DoesNotExist,
            values: vec![],
        });
    }
    for (tok, op) in [(" notin ", Op::NotIn), (" in ", Op::In)] {
        if let Some(idx) = term.find(tok) {
            let key = term[..idx].trim();
            let rest = term[idx + tok.len()..].trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("expected '(values)' after {} in {term:?}", tok.trim()))?;
            check_key(key)?;
            let values: Vec<String> = inner
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
            for v in &values {
                check_value(v)?;
            }
            if values.is_empty() {
                return Err(format!("empty value set in {term:?}"));
            }
            return Ok(Requirement {
                key: key.into(),
                op,
                values,
            });
        }
    }
    for (tok, op) in [("!=", Op::NotEq), ("==", Op::Eq), ("=", Op::Eq)] {
        if let Some((k, v)) = term.split_once(tok) {
            let (k, v) = (k.trim(), v.trim());
            check_key(k)?;
            check_value(v)?;
            return Ok(Requirement {
                key: k.into(),
                op,
                values: vec![v.into()],
            });
        }
    }
    check_key(term)?;
    Ok(Requirement {
        key: term.into(),
        op: Op::Exists,
        values: vec![],
    })
}

/// A parsed field selector: `path=value` and `path!=value` terms, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(format!(
                    "invalid field selector term {term:?}: expected field=value or field!=value"
                ));
            };
            terms.push((path.trim().to_owned(), eq, value.trim().to_owned()));
        }
        Ok(Self { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// `get` returns the object's value of a field; a missing field is "".
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.terms.iter().all(|(path, eq, value)| {
            let actual = get(path).unwrap_or("");
            (actual == value) == *eq
        })
    }

    /// The value required by an equality term on `path`, if any.
    pub fn required(&self, path: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|(p, eq, _)| p == path && *eq)
            .map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_forms_match_like_kubernetes() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("tier in (front, back)", true),
            ("tier notin (front)", false),
            ("app,tier", true),
            ("!canary", true),
            ("!app", false),
            ("app=web,tier in (back)", false),
            ("missing!=x", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
        for bad in ["app=we b", "tier in (a", "tier in ()", "a b c=d", "-bad=x"] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn field_selector_matches_missing_fields_as_empty() {
        let f = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed").unwrap();
        assert!(f.matches(|p| match p {
            "spec.nodeName" => Some("n1"),
            _ => None,
        }));
        assert!(!f.matches(|_| None));
        assert_eq!(f.required("spec.nodeName"), Some("n1"));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
