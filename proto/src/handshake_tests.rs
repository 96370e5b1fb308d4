//! Admission and fencing, one rule at a time.

use super::*;

fn hello(epoch: u64) -> Hello {
    Hello::new(Role::Source, "jf").with_epoch(epoch)
}

fn view(fence: Fence) -> FolderView<'static> {
    FolderView {
        name: "jf",
        peer_allowed: true,
        promotion_pending: false,
        fence,
        promotable: false,
    }
}

fn at(epoch: u64) -> Fence {
    Fence {
        epoch,
        source: false,
    }
}

#[test]
fn a_source_at_our_epoch_is_admitted_and_a_newer_one_adopted() {
    assert_eq!(
        admit(&hello(3), "p", Some(view(at(3)))),
        Ok(Admit {
            epoch: 3,
            adopt: false
        })
    );
    assert_eq!(
        admit(&hello(5), "p", Some(view(at(3)))),
        Ok(Admit {
            epoch: 5,
            adopt: true
        })
    );
}

#[test]
fn bad_magic_and_other_versions_are_refused_as_unsupported() {
    let mut h = hello(0);
    h.magic = *b"NOTSTDY!";
    let r = admit(&h, "p", Some(view(at(0)))).expect_err("bad magic");
    assert_eq!(r.code(), ErrorCode::UnsupportedVersion);
    let mut h = hello(0);
    h.version = crate::PROTOCOL_VERSION + 1;
    let r = admit(&h, "p", Some(view(at(0)))).expect_err("another version");
    assert_eq!(r.code(), ErrorCode::UnsupportedVersion);
    assert!(r.to_string().contains("protocol version"), "{r}");
}

#[test]
fn a_replica_hello_is_refused() {
    let h = Hello::new(Role::Replica, "jf");
    let r = admit(&h, "p", Some(view(at(0)))).expect_err("a replica");
    assert_eq!(
        (r.code(), r.to_string()),
        (ErrorCode::Protocol, "peer is not a source".into())
    );
}

#[test]
fn an_epoch_without_successor_is_refused() {
    let r = admit(&hello(u64::MAX), "p", Some(view(at(0)))).expect_err("no successor");
    assert_eq!(r, Refusal::EpochPastMax { epoch: u64::MAX });
    assert_eq!(r.code(), ErrorCode::Protocol);
    assert!(admit(&hello(MAX_EPOCH), "p", Some(view(at(0)))).is_ok());
}

#[test]
fn an_unknown_folder_is_refused_by_name() {
    let r = admit(&hello(0), "p", None).expect_err("no folder");
    assert_eq!(r.code(), ErrorCode::Other);
    assert_eq!(r.to_string(), "this replica serves no folder named \"jf\"");
}

#[test]
fn a_peer_not_on_the_allow_list_is_refused() {
    let mut v = view(at(0));
    v.peer_allowed = false;
    let r = admit(&hello(0), "peer-9", Some(v)).expect_err("not allowed");
    assert_eq!(r.code(), ErrorCode::Other);
    assert_eq!(r.to_string(), "peer peer-9 may not push into folder \"jf\"");
}

#[test]
fn a_pending_promotion_refuses_for_now() {
    let mut v = view(at(0));
    v.promotion_pending = true;
    let r = admit(&hello(0), "p", Some(v)).expect_err("pending");
    assert!(r.to_string().contains("promotion is in progress"), "{r}");
    assert_eq!(r.reply_hello(), None);
}

#[test]
fn an_older_epoch_is_fenced_with_our_hello_first() {
    let r = admit(&hello(2), "p", Some(view(at(3)))).expect_err("older");
    assert_eq!(r.code(), ErrorCode::Fenced);
    assert!(r.to_string().contains("its epoch is older"), "{r}");
    let ours = r.reply_hello().expect("a hello to adopt");
    assert_eq!(
        (ours.role, ours.epoch, ours.folder.as_str()),
        (Role::Replica, 3, "jf")
    );
}

/// The hello a replica sends when it fences a source says the truth about
/// whether it could be promoted, not the default yes; a node that is the
/// source says yes.
#[test]
fn a_fenced_hello_says_whether_the_replica_is_promotable() {
    for promotable in [false, true] {
        let v = FolderView {
            promotable,
            ..view(at(3))
        };
        let r = admit(&hello(2), "p", Some(v)).expect_err("older");
        let ours = r.reply_hello().expect("a hello to adopt");
        assert_eq!(ours.promotable, promotable);
    }
    let source = Fence {
        epoch: 3,
        source: true,
    };
    let r = admit(&hello(3), "p", Some(view(source))).expect_err("two sources");
    assert_eq!(r.reply_hello().map(|h| h.promotable), Some(true));
}

#[test]
fn a_node_that_is_the_source_fences_any_other_source() {
    let fence = Fence {
        epoch: 3,
        source: true,
    };
    for theirs in [2, 3, 4] {
        let r = admit(&hello(theirs), "p", Some(view(fence))).expect_err("two sources");
        assert_eq!(r.code(), ErrorCode::Fenced);
        assert_eq!(r.reply_hello().map(|h| h.role), Some(Role::Source));
    }
    let r = admit(&hello(3), "p", Some(view(fence))).expect_err("same epoch");
    assert!(r.to_string().contains("two sources at one epoch"), "{r}");
}

#[test]
fn a_promotion_while_waiting_fences_the_session() {
    assert!(recheck("jf", "p", at(3), 3).is_ok());
    let r = recheck("jf", "p", at(4), 3).expect_err("promoted past");
    assert_eq!(r.code(), ErrorCode::Fenced);
    assert!(r.to_string().contains("while the session waited"), "{r}");
    let source = Fence {
        epoch: 3,
        source: true,
    };
    assert!(recheck("jf", "p", source, 3).is_err());
    assert_eq!(r.reply_hello(), None, "no hello: ours was sent already");
}

#[test]
fn a_source_judges_the_replica_hello() {
    let replica = |epoch| Hello::new(Role::Replica, "jf").with_epoch(epoch);
    assert_eq!(
        judge_answer(&replica(2), 3),
        Ok(Answer::Accepted { epoch: 2 })
    );
    assert_eq!(
        judge_answer(&replica(4), 3),
        Ok(Answer::FencedBy { epoch: 4 })
    );
    let source = Hello::new(Role::Source, "jf").with_epoch(3);
    assert_eq!(
        judge_answer(&source, 3),
        Ok(Answer::Claimed {
            role: Role::Source,
            epoch: 3
        })
    );
    let newer_source = Hello::new(Role::Source, "jf").with_epoch(9);
    assert_eq!(
        judge_answer(&newer_source, 3),
        Ok(Answer::FencedBy { epoch: 9 })
    );
    let mut bad = replica(0);
    bad.version += 1;
    assert!(judge_answer(&bad, 0).is_err());
    assert_eq!(
        claim_text(Role::Source, 3),
        "peer is the folder's source at epoch 3"
    );
}

#[test]
fn fences_adopt_only_newer_epochs_and_never_as_source() {
    assert!(at(3).adopts(4));
    assert!(!at(3).adopts(3));
    let source = Fence {
        epoch: 3,
        source: true,
    };
    assert!(!source.adopts(9));
    assert_eq!(source.role(), Role::Source);
}
