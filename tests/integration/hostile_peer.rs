//! A scriptable hostile peer (in the spirit of rsync's `testsuite/rsync_proto.py`):
//! a test-only client on top of `proto` that is pinned by a real `sync-agent
//! replica` and sends it whatever frames a test scripts, valid or crafted byte by
//! byte; and a hostile replica that an in-process source pushes to.

use crate::util::*;
use proto::frame;
use proto::{Entry, Hello, Kind, Message, Meta, RelPath, Role};
use std::path::{Path, PathBuf};
use std::time::Duration;
use sync_agent::{Identity, NodeId, tls};

/// How long a test waits for the agent's answer before calling it a hang.
pub const ANSWER: Duration = Duration::from_secs(20);

/// A real `sync-agent replica` process serving `root`, which pins `me`.
pub struct Target {
    pub t: tempfile::TempDir,
    pub root: PathBuf,
    /// A directory beside the root whose content, mode and owner must not change.
    pub outside: PathBuf,
    pub log: PathBuf,
    pub agent: Agent,
    pub id: NodeId,
    pub me: Identity,
}

impl Target {
    /// A replica with an empty root and a sentinel directory beside it.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// The same, with environment variables for the agent.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_pinning(env, &[])
    }

    /// The same, pinning `others` too.
    pub fn start_pinning(env: &[(&str, &str)], others: &[NodeId]) -> Self {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(outside.join("etc")).unwrap();
        std::fs::write(outside.join("sentinel"), b"outside the root").unwrap();
        std::fs::write(outside.join("etc/passwd"), b"root:x:0:0").unwrap();
        sh(&format!(
            "chmod 640 {o}/sentinel && chown 4321:4321 {o}/sentinel",
            o = outside.display()
        ));
        let rid = t.path().join("id-replica");
        let id: NodeId = keygen(&rid).parse().unwrap();
        let me = Identity::generate().unwrap();
        let log = t.path().join("replica.log");
        let allow: Vec<String> = std::iter::once(me.id())
            .chain(others.iter().copied())
            .map(|i| i.to_string())
            .collect();
        let agent = replica_logged(&root, &rid, &allow.join(","), &log, env);
        Self {
            t,
            root,
            outside,
            log,
            agent,
            id,
            me,
        }
    }

    /// Connects as the pinned peer; `hello` sends ours and reads the replica's.
    pub async fn connect(&self) -> Peer {
        Peer::connect(&self.me, self.id, self.addr()).await
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.agent.addr.parse().unwrap()
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log naming a failed session with our peer.
    pub fn session_errors(&self) -> Vec<String> {
        let needle = format!("session with peer {}", self.me.id());
        self.log()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect()
    }

    /// Waits until the log names `n` failed sessions with our peer; returns
    /// the last such line.
    pub async fn wait_session_errors(&self, n: usize) -> String {
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            let errs = self.session_errors();
            if errs.len() >= n {
                return errs[n - 1].clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent logged {} failed sessions, not {n}:\n{}",
                errs.len(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The agent still runs.
    pub fn alive(&mut self) -> bool {
        self.agent.child.try_wait().unwrap().is_none()
    }

    pub fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.agent.child.id())
    }

    /// "Clean": the agent is alive, no temp file is left in the root, the
    /// sentinel directory is as `before`.
    pub fn assert_clean(&mut self, before: &[Snap]) {
        assert!(self.alive(), "the agent died:\n{}", self.log());
        assert!(!self.log().contains("panicked"), "{}", self.log());
        let temps = temp_files(&self.root);
        assert!(temps.is_empty(), "temp files left: {temps:?}");
        assert_eq!(snapshot(&self.outside), before, "the outside changed");
    }

    /// After hostile input, a good push of a `keep` file replaces the
    /// root's: the agent still serves and applies.
    pub async fn still_applies(&self) {
        let src = self.t.path().join("good");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("keep"), b"good data").unwrap();
        self.push_ok(&src).await;
        assert_eq!(std::fs::read(self.root.join("keep")).unwrap(), b"good data");
    }

    /// A well-behaved push of `src` with our identity must succeed: the agent
    /// still serves.
    pub async fn push_ok(&self, src: &Path) -> sync_agent::Summary {
        let opts = sync_agent::PushOptions {
            src: src.to_path_buf(),
            to: self.addr(),
            identity: self.me.clone(),
            peer: self.id,
            folder: "default".into(),
            filter: Default::default(),
            protocol_version: proto::PROTOCOL_VERSION,
            checksum: false,
            state: None,
            bwlimit: None,
        };
        tokio::time::timeout(
            ANSWER,
            sync_agent::push(opts, std::sync::Arc::new(Default::default())),
        )
        .await
        .expect("a good push hung")
        .unwrap_or_else(|e| panic!("a good push failed: {e:#}\n{}", self.log()))
    }
}

/// One connection of the hostile peer, its control stream open.
pub struct Peer {
    pub ep: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// The replica ended the session with an error (it closes by itself).
    pub refused: bool,
    /// A message read after the replica's hello that was not its tree digest.
    pending: Option<Option<Message>>,
}

impl Peer {
    /// Connects and opens the control stream (nothing sent yet: QUIC opens the
    /// stream on the peer's side with its first byte).
    pub async fn connect(me: &Identity, peer: NodeId, addr: std::net::SocketAddr) -> Self {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(tls::client_config(me, peer).unwrap());
        let conn = ep.connect(addr, tls::SERVER_NAME).unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            ep,
            conn,
            send,
            recv,
            refused: false,
            pending: None,
        }
    }

    /// Sends our hello and returns the replica's; the tree digest it offers
    /// next (once its scan is done) is read and dropped.
    pub async fn hello(&mut self) -> Message {
        self.send(&Message::Hello(Hello::new(Role::Source, "default")))
            .await;
        let hello = self.expect().await;
        if matches!(hello, Message::Hello(_)) {
            let next = tokio::time::timeout(ANSWER, read_msg(&mut self.recv))
                .await
                .expect("the replica offered no tree digest (hang)");
            if !matches!(next, Some(Message::TreeDigest { .. })) {
                self.refused |= matches!(next, Some(Message::Error { .. }) | None);
                self.pending = Some(next);
            }
        }
        hello
    }

    pub async fn send(&mut self, msg: &Message) {
        self.send_raw(&encode(msg)).await;
    }

    /// Bytes as they are on the control stream (a closed stream is fine: the
    /// agent may have refused already).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.send.write_all(bytes).await;
    }

    /// The next control message, or `None` when the replica closed (the
    /// replica's tree digest, which it offers once after its hello, skipped).
    pub async fn recv(&mut self) -> Option<Message> {
        if let Some(m) = self.pending.take() {
            return m;
        }
        let m = tokio::time::timeout(ANSWER, async {
            loop {
                match read_msg(&mut self.recv).await {
                    Some(Message::TreeDigest { .. }) => {}
                    m => return m,
                }
            }
        })
        .await
        .expect("the replica did not answer (hang)");
        self.refused |= matches!(m, Some(Message::Error { .. }) | None);
        m
    }

    pub async fn expect(&mut self) -> Message {
        self.recv()
            .await
            .expect("the replica closed without answering")
    }

    /// Waits for the replica to open a file stream and returns its request.
    pub async fn next_request(&mut self) -> FileStream {
        let (send, mut recv) = tokio::time::timeout(ANSWER, self.conn.accept_bi())
            .await
            .expect("no file request (hang)")
            .expect("connection lost while waiting for a file request");
        match read_msg(&mut recv).await {
            Some(Message::FileRequest { index, signature }) => FileStream {
                send,
                index,
                signature,
            },
            other => panic!("expected a file request, got {other:?}"),
        }
    }

    /// Waits for the replica to open a stream asking for several files at
    /// once; returns the stream to answer on and the indexes asked for.
    pub async fn next_files_request(&mut self) -> (quinn::SendStream, Vec<u64>) {
        let (send, mut recv) = tokio::time::timeout(ANSWER, self.conn.accept_bi())
            .await
            .expect("no files request (hang)")
            .expect("connection lost while waiting for a files request");
        match read_msg(&mut recv).await {
            Some(Message::FilesRequest { indexes }) => (send, indexes),
            other => panic!("expected a files request, got {other:?}"),
        }
    }

    /// Serves the replica's file requests in the background with `answer`.
    pub fn serve_requests(
        &self,
        answer: impl Fn(u64, Option<Vec<u8>>) -> Vec<Message> + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let conn = self.conn.clone();
        tokio::spawn(async move {
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                if let Some(Message::FileRequest { index, signature }) = read_msg(&mut recv).await {
                    let msgs = answer(index, signature.clone());
                    tokio::spawn(
                        FileStream {
                            send,
                            index,
                            signature,
                        }
                        .answer_owned(msgs),
                    );
                }
            }
        })
    }

    /// Ends the session as a source does: finishes the control stream and lets
    /// the replica close.
    pub async fn close(mut self) {
        if !self.refused {
            let _ = self.send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.closed()).await;
        }
        self.conn.close(0u32.into(), b"");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ep.wait_idle()).await;
    }
}

/// A file request from the replica, answered with whatever the test sends.
pub struct FileStream {
    pub send: quinn::SendStream,
    pub index: u64,
    pub signature: Option<Vec<u8>>,
}

impl FileStream {
    pub async fn answer_owned(self, msgs: Vec<Message>) {
        self.answer(&msgs).await
    }

    pub async fn answer(mut self, msgs: &[Message]) {
        for m in msgs {
            let _ = self.send.write_all(&encode(m)).await;
        }
        let _ = self.send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.send.stopped()).await;
    }
}

/// One frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    frame::encode(msg, &mut buf).unwrap();
    buf
}

/// Reads one frame from a stream; `None` at its end or on a reset.
pub async fn read_msg(recv: &mut quinn::RecvStream) -> Option<Message> {
    let mut header = [0u8; frame::HEADER_LEN];
    recv.read_exact(&mut header).await.ok()?;
    let len = frame::frame_len(header).unwrap();
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.ok()?;
    // An undecodable frame from the agent is a finding of its own: shown, not
    // unwrapped, so that the test names it.
    Some(
        frame::decode_body(&body).unwrap_or_else(|e| Message::Error {
            code: proto::ErrorCode::Other,
            message: format!(
                "UNDECODABLE FRAME ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(400)])
            ),
        }),
    )
}

pub fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        mtime_sec: 1_700_000_000,
        ..Default::default()
    }
}

pub fn dir(path: &str) -> Entry {
    Entry {
        path: RelPath::new(path.as_bytes()).unwrap(),
        kind: Kind::Dir,
        meta: meta(0o755),
    }
}

pub fn file(path: &str, content: &[u8]) -> Entry {
    Entry {
        path: RelPath::new(path.as_bytes()).unwrap(),
        kind: Kind::File {
            size: content.len() as u64,
            hash: *blake3::hash(content).as_bytes(),
        },
        meta: meta(0o644),
    }
}

pub fn symlink(path: &str, target: &[u8]) -> Entry {
    Entry {
        path: RelPath::new(path.as_bytes()).unwrap(),
        kind: Kind::Symlink {
            target: target.to_vec(),
        },
        meta: meta(0o777),
    }
}

/// A round's first message.
pub fn round_start(id: u64, full: bool) -> Message {
    Message::RoundStart {
        id,
        full,
        checksum: false,
        verify: false,
    }
}

/// A whole round's frames: start, the entries in batches, end (with the
/// manifest's true root hash when `full`).
pub fn round(id: u64, full: bool, entries: Vec<Entry>) -> Vec<u8> {
    let mut buf = encode(&round_start(id, full));
    let n = entries.len() as u64;
    let root_hash = sync_core::Manifest {
        entries: entries.clone(),
    }
    .root_hash();
    for chunk in entries.chunks(proto::MAX_ENTRIES_PER_BATCH) {
        buf.extend(encode(&Message::Manifest(chunk.to_vec())));
    }
    buf.extend(encode(&Message::RoundEnd {
        id,
        entries: n,
        root_hash,
    }));
    buf
}

/// bincode's standard varint of a length.
pub fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [&[251u8][..], &(n as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[252u8][..], &(n as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &n.to_le_bytes()].concat(),
    }
}

/// Replaces, in one frame, the first byte string `placeholder` (with its length
/// prefix) by `bad` (with its own), and fixes the frame's length: the encoder
/// refuses to build a bad path, a hostile peer does not.
pub fn splice(frame_bytes: &[u8], placeholder: &[u8], bad: &[u8]) -> Vec<u8> {
    let mut needle = varint(placeholder.len() as u64);
    needle.extend_from_slice(placeholder);
    let at = frame_bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("placeholder in the frame");
    let mut body = frame_bytes[frame::HEADER_LEN..at].to_vec();
    body.extend(varint(bad.len() as u64));
    body.extend_from_slice(bad);
    body.extend_from_slice(&frame_bytes[at + needle.len()..]);
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A hostile replica: an endpoint pinning `source`, to which an in-process
/// source pushes `src`.
pub struct HostileReplica {
    pub ep: quinn::Endpoint,
    pub push: tokio::task::JoinHandle<anyhow::Result<sync_agent::Summary>>,
}

impl HostileReplica {
    pub fn start(src: &Path) -> Self {
        let (me, source) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let ep = tls::server("127.0.0.1:0".parse().unwrap(), &me, vec![source.id()]).unwrap();
        let opts = sync_agent::PushOptions {
            src: src.to_path_buf(),
            to: ep.local_addr().unwrap(),
            identity: source,
            peer: me.id(),
            folder: "default".into(),
            filter: Default::default(),
            protocol_version: proto::PROTOCOL_VERSION,
            checksum: false,
            state: None,
            bwlimit: None,
        };
        let push = tokio::spawn(sync_agent::push(
            opts,
            std::sync::Arc::new(Default::default()),
        ));
        Self { ep, push }
    }

    /// Accepts the source, exchanges hellos and reads its round: returns the
    /// connection, the control stream and the round's entries.
    pub async fn accept_round(&self) -> (quinn::Connection, Peer2, Vec<Entry>) {
        let conn = tokio::time::timeout(ANSWER, async {
            self.ep.accept().await.unwrap().await.unwrap()
        })
        .await
        .expect("the source never connected");
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        assert!(matches!(read_msg(&mut recv).await, Some(Message::Hello(_))));
        send.write_all(&encode(&Message::Hello(Hello::new(
            Role::Replica,
            "default",
        ))))
        .await
        .unwrap();
        send.write_all(&encode(&Message::TreeDigest { digest: None }))
            .await
            .unwrap();
        let mut entries = Vec::new();
        loop {
            match read_msg(&mut recv).await.expect("the source closed") {
                Message::Manifest(b) => entries.extend(b),
                Message::RoundEnd { .. } => break,
                _ => {}
            }
        }
        (conn, Peer2 { send, _recv: recv }, entries)
    }
}

/// The replica's end of the control stream.
pub struct Peer2 {
    pub send: quinn::SendStream,
    /// Held so that the stream stays open.
    pub _recv: quinn::RecvStream,
}

/// Asks the source for `index` with `signature` on a new stream and returns
/// what it answered, in order, until the stream ended (or `ANSWER` passed).
pub async fn request(
    conn: &quinn::Connection,
    index: u64,
    signature: Option<Vec<u8>>,
) -> Result<Vec<Message>, &'static str> {
    request_msg(conn, &Message::FileRequest { index, signature }).await
}

/// Sends `msg` to the source on a new stream and returns what it answered,
/// in order, until the stream ended (or `ANSWER` passed).
pub async fn request_msg(
    conn: &quinn::Connection,
    msg: &Message,
) -> Result<Vec<Message>, &'static str> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(msg)).await.unwrap();
    let _ = send.finish();
    tokio::time::timeout(ANSWER, async {
        let mut got = Vec::new();
        while let Some(m) = read_msg(&mut recv).await {
            got.push(m);
        }
        got
    })
    .await
    .map_err(|_| "the source did not answer or end the stream (hang)")
}
