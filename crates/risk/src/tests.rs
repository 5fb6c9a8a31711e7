use super::*;
use meridian_api::meridian::{DeletionBudget, DenyWindow, RiskPolicySpec, RiskRules, RiskSelector};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn policy(ns: Option<&str>, selector: RiskSelector, rules: RiskRules) -> Policy {
    let mut p = RiskPolicy {
        spec: RiskPolicySpec {
            mode: None,
            selector,
            rules,
        },
        ..Default::default()
    };
    p.metadata.name = Some("p".into());
    p.metadata.namespace = ns.map(str::to_owned);
    p.metadata.uid = Some("uid-1".into());
    Policy::compile(&p, ns.is_none()).unwrap()
}

fn pod(ns: &str, name: &str, app: &str, workload: Option<(&str, &str)>) -> Subject {
    Subject {
        kind: "Pod".into(),
        namespace: Some(ns.into()),
        name: name.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        unlock_until: None,
        workload: workload.map(|(k, n)| Workload {
            kind: k.into(),
            name: n.into(),
            labels: [("tier".to_owned(), "front".to_owned())].into(),
        }),
    }
}

fn kinds(k: &[&str]) -> RiskSelector {
    RiskSelector {
        kinds: k.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn a_namespaced_policy_covers_only_its_namespace() {
    let p = policy(
        Some("acme.default"),
        kinds(&["Pod"]),
        RiskRules {
            protect: true,
            ..Default::default()
        },
    );
    assert!(p.selects(&pod("acme.default", "a", "web", None)));
    assert!(!p.selects(&pod("acme.other", "a", "web", None)));
    assert!(!p.selects(&pod("beta.default", "a", "web", None)));
}

#[test]
fn a_policy_on_a_workload_covers_its_pods() {
    let sel = RiskSelector {
        kinds: vec!["Deployment".into()],
        names: vec!["web".into()],
        ..Default::default()
    };
    let p = policy(
        Some("ns"),
        sel,
        RiskRules {
            protect: true,
            ..Default::default()
        },
    );
    assert!(p.selects(&pod("ns", "web-1", "x", Some(("Deployment", "web")))));
    assert!(!p.selects(&pod("ns", "api-1", "x", Some(("Deployment", "api")))));
    assert!(
        !p.selects(&pod("ns", "web", "x", None)),
        "a bare pod named web is no Deployment"
    );
}

#[test]
fn labels_select_objects_and_workloads() {
    let sel = RiskSelector {
        label_selector: Some(
            serde_json::from_value(serde_json::json!({"matchLabels": {"tier": "front"}})).unwrap(),
        ),
        ..Default::default()
    };
    let p = policy(
        None,
        sel,
        RiskRules {
            protect: true,
            ..Default::default()
        },
    );
    assert!(p.selects(&pod("any", "a", "x", Some(("Deployment", "web")))));
    assert!(!p.selects(&pod("any", "a", "x", None)));
}

#[test]
fn cluster_policies_select_namespaces_by_name() {
    let sel = RiskSelector {
        namespaces: vec!["prod".into()],
        ..Default::default()
    };
    let p = policy(
        None,
        sel,
        RiskRules {
            protect: true,
            ..Default::default()
        },
    );
    let ns = Subject {
        kind: "Namespace".into(),
        namespace: None,
        name: "prod".into(),
        labels: BTreeMap::new(),
        unlock_until: None,
        workload: None,
    };
    assert!(p.selects(&ns));
    assert!(p.selects(&pod("prod", "a", "x", None)));
    assert!(!p.selects(&pod("dev", "a", "x", None)));
}

#[test]
fn deny_windows_follow_the_clock() {
    let rules = RiskRules {
        deny_windows: vec![DenyWindow {
            schedule: Some("0 18 * * fri".into()),
            duration: Some("60h".into()),
            time_zone: Some("Europe/Paris".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let p = policy(Some("ns"), RiskSelector::default(), rules);
    let s = pod("ns", "a", "x", None);
    // Friday 2026-11-27 18:00 Paris = 17:00 UTC; open until Monday 06:00 Paris.
    assert!(p.check_rules(&s, at("2026-11-27T16:59:00Z")).is_none());
    let d = p.check_rules(&s, at("2026-11-27T17:00:00Z")).unwrap();
    assert_eq!(d.kind, DenialKind::Window);
    assert_eq!(d.rule, "denyWindows[0]");
    assert_eq!(d.until, Some(at("2026-11-30T05:00:00Z")));
    assert!(p.check_rules(&s, at("2026-11-29T23:00:00Z")).is_some());
    assert!(p.check_rules(&s, at("2026-11-30T05:00:00Z")).is_none());
}

#[test]
fn protection_needs_a_short_unexpired_unlock() {
    let p = policy(
        Some("ns"),
        RiskSelector::default(),
        RiskRules {
            protect: true,
            ..Default::default()
        },
    );
    let now = at("2026-11-27T12:00:00Z");
    let mut s = pod("ns", "a", "x", None);
    assert_eq!(p.check_rules(&s, now).unwrap().kind, DenialKind::Protected);
    for (unlock, ok) in [
        ("2026-11-27T13:00:00Z", true),
        ("2026-11-27T11:00:00Z", false),
        ("2026-11-29T13:00:00Z", false),
        ("tomorrow", false),
    ] {
        s.unlock_until = Some(unlock.into());
        assert_eq!(p.check_rules(&s, now).is_none(), ok, "{unlock}");
    }
}

#[test]
fn budgets_count_per_period_and_say_when_they_free() {
    let rules = RiskRules {
        max_deletions: vec![DeletionBudget {
            count: Some(2),
            period: "10m".into(),
            per: None,
        }],
        ..Default::default()
    };
    let p = policy(Some("ns"), RiskSelector::default(), rules);
    let b = &p.budgets[0];
    let s = pod("ns", "web-1", "x", Some(("Deployment", "web")));
    assert_eq!(b.scope(&s), "Deployment/web");
    assert_eq!(
        p.budget_key(b, &s),
        "/meridian/riskbudgets/uid-1/0/Deployment/web"
    );
    let mut r = BudgetRecord::new(&p, b, &s);
    let t0 = at("2026-11-27T12:00:00Z");
    assert!(r.charge(b, t0).is_ok());
    assert!(r.charge(b, at("2026-11-27T12:01:00Z")).is_ok());
    assert_eq!(
        r.charge(b, at("2026-11-27T12:05:00Z")),
        Err(Some(at("2026-11-27T12:10:00Z")))
    );
    assert!(r.charge(b, at("2026-11-27T12:09:59.999Z")).is_err());
    assert!(r.charge(b, at("2026-11-27T12:10:00.001Z")).is_ok());
    assert_eq!(r.used(), 2);
}

#[test]
fn a_burst_of_deletions_keeps_the_record_small() {
    let rules = RiskRules {
        max_deletions: vec![DeletionBudget {
            count: Some(1000),
            period: "1h".into(),
            per: Some("Policy".into()),
        }],
        ..Default::default()
    };
    let p = policy(Some("ns"), RiskSelector::default(), rules);
    let b = &p.budgets[0];
    let mut r = BudgetRecord::new(&p, b, &pod("ns", "a", "x", None));
    let t0 = at("2026-11-27T12:00:00Z");
    for i in 0..1000 {
        let t = t0.checked_add(SignedDuration::from_millis(i)).unwrap();
        assert!(r.charge(b, t).is_ok());
    }
    assert_eq!(r.used(), 1000);
    assert_eq!(r.times.len(), 1, "{:?}", r.times);
    assert!(
        r.charge(b, t0.checked_add(SignedDuration::from_secs(2)).unwrap())
            .is_err()
    );
}

#[test]
fn a_zero_budget_never_frees() {
    let rules = RiskRules {
        max_deletions: vec![DeletionBudget {
            count: Some(0),
            period: "1h".into(),
            per: Some("Namespace".into()),
        }],
        ..Default::default()
    };
    let p = policy(Some("ns"), RiskSelector::default(), rules);
    let s = pod("ns", "a", "x", None);
    let mut r = BudgetRecord::new(&p, &p.budgets[0], &s);
    assert_eq!(
        r.charge(&p.budgets[0], at("2026-11-27T12:00:00Z")),
        Err(None)
    );
    assert_eq!(p.budgets[0].scope(&s), "Namespace/ns");
}

#[test]
fn a_manual_clock_moves_only_when_told() {
    let c = Clock::manual(at("2026-11-27T12:00:00Z"));
    assert_eq!(c.now(), at("2026-11-27T12:00:00Z"));
    c.advance(SignedDuration::from_mins(30));
    assert_eq!(c.now(), at("2026-11-27T12:30:00Z"));
    c.set(at("2027-01-01T00:00:00Z"));
    assert_eq!(c.now(), at("2027-01-01T00:00:00Z"));
}
