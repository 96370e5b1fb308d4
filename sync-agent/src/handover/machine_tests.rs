//! Every step and every failure of the handover machine, without I/O.

use super::*;

fn ok_checks() -> Vec<Check> {
    vec![Check {
        name: "replica connected".into(),
        ok: true,
        detail: "peer x".into(),
    }]
}

fn hook(hook: Hook, result: Result<(), String>) -> Event {
    Event::Hook { hook, result }
}

/// The actions without the progress lines.
fn effects(acts: &[Action]) -> Vec<Action> {
    acts.iter()
        .filter(|a| !matches!(a, Action::Report(_)))
        .cloned()
        .collect()
}

fn steps(acts: &[Action]) -> Vec<Step> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Persist(r) => Some(r.step),
            _ => None,
        })
        .collect()
}

fn outcome(acts: &[Action]) -> Outcome {
    acts.iter()
        .find_map(|a| match a {
            Action::Finish(o) => Some(o.clone()),
            _ => None,
        })
        .expect("a Finish action")
}

/// A machine that has stopped the source's application and asked for the cut.
fn at_final_cut() -> Machine {
    let mut m = Machine::new("jf", Kind::Failover, 2, 100, false);
    let _ = m.start();
    let _ = m.handle(Event::Preflight(ok_checks()));
    let _ = m.handle(hook(Hook::StopSource, Ok(())));
    assert_eq!(m.record().step, Step::FinalCut);
    m
}

fn at_promote() -> Machine {
    let mut m = at_final_cut();
    let _ = m.handle(Event::Cut(Ok("roots match".into())));
    assert_eq!(m.record().step, Step::Promote);
    m
}

fn expect_rollback(acts: &[Action]) {
    assert_eq!(steps(acts), vec![Step::RollingBack]);
    assert_eq!(
        effects(acts).last(),
        Some(&Action::RunHook(Hook::StartSource)),
        "{acts:?}"
    );
}

#[test]
fn happy_path_persists_before_every_side_effect() {
    let mut m = Machine::new("jf", Kind::Failover, 2, 100, false);
    assert_eq!(effects(&m.start()), vec![Action::Preflight]);
    let a = m.handle(Event::Preflight(ok_checks()));
    let e = effects(&a);
    assert!(matches!(&e[0], Action::Persist(r) if r.step == Step::StopSource && r.to_epoch == 3));
    assert_eq!(e[1], Action::RunHook(Hook::StopSource));
    let e = effects(&m.handle(hook(Hook::StopSource, Ok(()))));
    assert!(matches!(&e[0], Action::Persist(r) if r.step == Step::FinalCut));
    assert_eq!(e[1], Action::TakeCut);
    let e = effects(&m.handle(Event::Cut(Ok("roots match".into()))));
    assert!(matches!(&e[0], Action::Persist(r) if r.step == Step::Promote));
    assert_eq!(e[1], Action::SendPromote { epoch: 3 });
    let e = effects(&m.handle(Event::Promotion(Ok(()))));
    assert!(matches!(&e[0], Action::Persist(r) if r.step == Step::Demote));
    assert_eq!(e[1], Action::BecomeReplica { epoch: 3 });
    let a = m.handle(Event::Demoted(Ok(())));
    assert_eq!(effects(&a)[0], Action::Clear);
    let o = outcome(&a);
    assert!(o.ok && o.step == "done", "{o:?}");
    assert_eq!(o.this_node, "the replica at epoch 3");
    assert_eq!(o.peer, "the source at epoch 3");
    assert!(m.finished());
    assert!(m.handle(Event::Demoted(Ok(()))).is_empty());
}

#[test]
fn failed_preflight_changes_nothing() {
    let mut m = Machine::new("jf", Kind::Failover, 0, 100, false);
    let _ = m.start();
    let a = m.handle(Event::Preflight(vec![Check {
        name: "replica databases free".into(),
        ok: false,
        detail: "library.db held open by pid 42 (jellyfin)".into(),
    }]));
    let e = effects(&a);
    assert_eq!(e.len(), 1, "no persist, no hook, no clear: {e:?}");
    let o = outcome(&a);
    assert!(!o.ok && o.step == "failed");
    let err = o.error.unwrap();
    assert!(
        err.contains("library.db held open by pid 42 (jellyfin)"),
        "{err}"
    );
    assert!(o.this_node.contains("nothing changed"), "{}", o.this_node);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Report(l) if l.contains("[FAIL]")))
    );
}

#[test]
fn dry_run_reports_checks_and_plan_and_does_nothing() {
    let mut m = Machine::new("jf", Kind::Failback, 4, 100, true);
    let _ = m.start();
    let a = m.handle(Event::Preflight(ok_checks()));
    assert_eq!(effects(&a).len(), 1, "{a:?}");
    assert!(outcome(&a).ok);
    let lines: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            Action::Report(l) => Some(l.as_str()),
            _ => None,
        })
        .collect();
    assert!(lines.iter().any(|l| l.contains("[ok] replica connected")));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("promote the replica to epoch 5"))
    );
}

#[test]
fn persisting_the_first_step_fails_nothing_stopped() {
    let mut m = Machine::new("jf", Kind::Failover, 0, 100, false);
    let _ = m.start();
    let _ = m.handle(Event::Preflight(ok_checks()));
    let a = m.handle(Event::PersistFailed("disk full".into()));
    let o = outcome(&a);
    assert!(!o.ok && o.error.unwrap().contains("disk full"));
    assert!(!effects(&a).contains(&Action::RunHook(Hook::StartSource)));
}

#[test]
fn stop_source_failure_rolls_back() {
    let mut m = Machine::new("jf", Kind::Failover, 0, 100, false);
    let _ = m.start();
    let _ = m.handle(Event::Preflight(ok_checks()));
    let a = m.handle(hook(Hook::StopSource, Err("exit 3: cannot stop".into())));
    expect_rollback(&a);
    let a = m.handle(hook(Hook::StartSource, Ok(())));
    let o = outcome(&a);
    assert_eq!(o.step, "rolled_back");
    assert!(o.error.unwrap().contains("cannot stop"));
    assert!(o.this_node.contains("still the source at epoch 0"));
    assert_eq!(effects(&a)[0], Action::Clear);
}

#[test]
fn cut_failure_rolls_back() {
    let mut m = at_final_cut();
    let a = m.handle(Event::Cut(Err("root hashes differ".into())));
    expect_rollback(&a);
    let o = outcome(&m.handle(hook(Hook::StartSource, Ok(()))));
    assert!(
        o.error
            .unwrap()
            .contains("final cut failed: root hashes differ")
    );
}

#[test]
fn persist_failures_after_stop_source_roll_back() {
    let mut m = Machine::new("jf", Kind::Failover, 0, 100, false);
    let _ = m.start();
    let _ = m.handle(Event::Preflight(ok_checks()));
    let _ = m.handle(hook(Hook::StopSource, Ok(())));
    expect_rollback(&m.handle(Event::PersistFailed("EIO".into())));
    let mut m = at_final_cut();
    let _ = m.handle(Event::Cut(Ok("ok".into())));
    // The promotion was not sent: its record could not be written.
    expect_rollback(&m.handle(Event::PersistFailed("EIO".into())));
    // The rollback's own record cannot be written: start_source runs anyway.
    assert_eq!(
        m.handle(Event::PersistFailed("EIO".into())),
        vec![Action::RunHook(Hook::StartSource)]
    );
}

#[test]
fn refused_promotion_rolls_back() {
    let mut m = at_promote();
    let a = m.handle(Event::Promotion(Err(PromoteFailure::Refused(
        "start_replica exit 4".into(),
    ))));
    expect_rollback(&a);
    let o = outcome(&m.handle(hook(Hook::StartSource, Ok(()))));
    assert_eq!(o.step, "rolled_back");
    assert!(o.peer.contains("the replica at epoch 2"));
}

#[test]
fn lost_answer_asks_the_peer_and_never_restarts_blindly() {
    let mut m = at_promote();
    let a = m.handle(Event::Promotion(Err(PromoteFailure::Lost(
        "session closed".into(),
    ))));
    assert_eq!(effects(&a), vec![Action::ObservePeer { epoch: 3 }]);
    // Time passes: lines, never a hook.
    assert!(m.handle(Event::Tick { now_unix: 200 }).is_empty());
    assert!(m.handle(Event::Tick { now_unix: 205 }).is_empty());
    let a = m.handle(Event::Tick { now_unix: 211 });
    assert!(
        matches!(&a[..], [Action::Report(l)] if l.contains("still waiting for the peer (11 s)"))
    );
    // The peer holds the new epoch: complete.
    let e = effects(&m.handle(Event::Peer(Peer::Promoted { epoch: 3 })));
    assert_eq!(e[1], Action::BecomeReplica { epoch: 3 });
    assert!(outcome(&m.handle(Event::Demoted(Ok(())))).ok);

    // The peer still takes this node at the old epoch: roll back.
    let mut m = at_promote();
    let _ = m.handle(Event::Promotion(Err(PromoteFailure::Lost(
        "timeout".into(),
    ))));
    expect_rollback(&m.handle(Event::Peer(Peer::NotPromoted)));
}

#[test]
fn failed_demotion_is_reported_and_starts_nothing() {
    let mut m = at_promote();
    let _ = m.handle(Event::Promotion(Ok(())));
    let a = m.handle(Event::Demoted(Err("EROFS".into())));
    let o = outcome(&a);
    assert!(!o.ok && o.step == "failed");
    assert!(o.error.unwrap().contains("EROFS"));
    assert!(!effects(&a).contains(&Action::RunHook(Hook::StartSource)));
    // A record that cannot be written still demotes.
    let mut m = at_promote();
    let _ = m.handle(Event::Promotion(Ok(())));
    assert_eq!(
        m.handle(Event::PersistFailed("EIO".into())),
        vec![Action::BecomeReplica { epoch: 3 }]
    );
}

#[test]
fn rollback_failures_say_so() {
    let mut m = at_final_cut();
    let _ = m.handle(Event::Cut(Err("x".into())));
    let o = outcome(&m.handle(hook(Hook::StartSource, Err("exit 1".into()))));
    assert_eq!(o.step, "failed");
    assert!(o.error.unwrap().contains("start_source FAILED: exit 1"));
    // A node that is a replica now never starts the source's application.
    let mut m = at_final_cut();
    let _ = m.handle(Event::Cut(Err("x".into())));
    let o = outcome(&m.handle(Event::RestartRefused { epoch: 7 }));
    assert_eq!(o.step, "failed");
    assert!(
        o.error
            .unwrap()
            .contains("NOT run: this node is the replica at epoch 7")
    );
}

#[test]
fn unexpected_events_change_nothing() {
    let mut m = at_final_cut();
    let a = m.handle(Event::Promotion(Ok(())));
    assert!(matches!(&a[..], [Action::Report(l)] if l.contains("ignored")));
    assert_eq!(m.record().step, Step::FinalCut);
    // Another hook's answer is not stop_source's.
    let mut m = Machine::new("jf", Kind::Failover, 0, 100, false);
    let _ = m.start();
    let _ = m.handle(Event::Preflight(ok_checks()));
    let _ = m.handle(hook(Hook::StartSource, Ok(())));
    assert_eq!(m.record().step, Step::StopSource);
}

fn record(step: Step) -> Record {
    Record {
        folder: "jf".into(),
        kind: Kind::Failover,
        step,
        from_epoch: 5,
        to_epoch: 6,
        started_unix: 100,
        error: None,
    }
}

#[test]
fn resume_from_every_step() {
    // Nothing stopped yet.
    let (_, a) = Machine::resume(record(Step::Preflight));
    assert!(!effects(&a).contains(&Action::RunHook(Hook::StartSource)));
    assert!(effects(&a).contains(&Action::Clear));
    // stop_source ran (or may have), the promotion was never sent: start_source.
    for s in [Step::StopSource, Step::FinalCut, Step::RollingBack] {
        let (mut m, a) = Machine::resume(record(s));
        expect_rollback(&a);
        let o = outcome(&m.handle(hook(Hook::StartSource, Ok(()))));
        assert_eq!(o.step, "rolled_back", "{s}");
        assert!(o.error.unwrap().contains("agent stopped"));
    }
    // Sent, answer unknown: the peer decides.
    let (mut m, a) = Machine::resume(record(Step::Promote));
    assert_eq!(effects(&a), vec![Action::ObservePeer { epoch: 6 }]);
    expect_rollback(&m.handle(Event::Peer(Peer::NotPromoted)));
    let (mut m, _) = Machine::resume(record(Step::Promote));
    let _ = m.handle(Event::Peer(Peer::Promoted { epoch: 6 }));
    assert!(outcome(&m.handle(Event::Demoted(Ok(())))).ok);
    // Promoted already: finish the demotion.
    let (_, a) = Machine::resume(record(Step::Demote));
    assert_eq!(effects(&a)[1], Action::BecomeReplica { epoch: 6 });
    // Over: only the file goes.
    for s in [Step::Done, Step::RolledBack, Step::Failed] {
        let (m, a) = Machine::resume(record(s));
        assert_eq!(effects(&a), vec![Action::Clear]);
        assert!(m.finished());
    }
}
