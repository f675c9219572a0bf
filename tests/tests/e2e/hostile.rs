//! Hostile peers and strangers: an upstream that lies, a downstream or stranger that floods,
//! and files others could read or swap. Each attack is refused with a clear error and changes
//! nothing; afterwards the victim still serves a legitimate peer and verifies.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_tests::cascade::{self, Peer, Relations, Tls};
use holdfast_tests::fake_upstream::{FakeUpstream, Handler, endless, json};
use holdfast_tests::{TestNode, mixed_bytes};
use serde_json::{Value, json};

const ID1: &str = "0001000000000000000a";
const ID2: &str = "0001000000000000000b";

fn record(volume: &str, id: &str, size: u64, block_size: u64, labels: Value) -> Value {
    json!({
        "id": id, "volume": volume, "name": format!("s-{id}"), "created-unix-ms": 1,
        "size": size, "block-size": block_size, "labels": labels, "parent": null,
        "stats": {"blocks": 0, "zero-blocks": 0, "new-chunks": 0, "new-bytes": 0,
                  "new-stored-bytes": 0}
    })
}

fn listing(records: Vec<Value>) -> Value {
    json!({"node": "fake", "volume": "vm1", "snapshots": records})
}

/// A downstream node with a local volume vm3 (one snapshot) that mirrors vm1 from `upstream`.
fn downstream(upstream: &str) -> (TestNode, std::path::PathBuf) {
    let n = TestNode::new();
    let img = n.image("vm3.img", &mixed_bytes(1 << 20, 3));
    n.add_volume("vm3", &img, "64KiB");
    n.snapshot("vm3", "mine");
    let cfg = n.path("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "state = {:?}\n[[upstream]]\nname = \"fake\"\nurl = {upstream:?}\ntoken = \
             \"0123456789abcdef0123\"\n[[mirror]]\nvolume = \"vm1\"\nupstream = \"fake\"\nevery = \"1h\"\n",
            n.state
        ),
    )
    .unwrap();
    (n, cfg)
}

/// `mirror run vm1` against a fake upstream answering with `handler`; returns the run.
fn mirror_against(handler: Handler) -> (holdfast_tests::Run, TestNode, FakeUpstream) {
    let fake = FakeUpstream::start(handler);
    let (n, cfg) = downstream(&fake.url());
    let r = n.run(&["mirror", "run", "vm1", "--config", cfg.to_str().unwrap()]);
    (r, n, fake)
}

/// Nothing of the update is left: vm3 keeps its one snapshot, and no replica vm1 appeared
/// (not even an empty one: it would keep the block size and region the refused upstream
/// listed).
fn changed_nothing(n: &TestNode) {
    assert_eq!(n.snapshots("vm3").len(), 1, "vm3 changed");
    let vols = n.run(&["volume", "list", "--json"]).json();
    let names: Vec<&Value> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["name"])
        .collect();
    assert_eq!(names, vec!["vm3"], "{vols}");
    n.ok(&["verify"]);
}

/// The answer of an upstream that took a lock set.
fn lock_set_taken() -> axum::response::Response {
    json(
        200,
        json!({"outcome": "replaced", "generation": 1, "locks": 1, "released": 0}),
    )
}

/// A config for B's relation (vm1 from "a"), pointed at `fake` under A's name.
fn pointed_at(b: &Peer, fake: &FakeUpstream) -> std::path::PathBuf {
    let cfg = b.node.path("fake.toml");
    std::fs::write(
        &cfg,
        format!(
            "state = {:?}\n[[upstream]]\nname = \"a\"\nurl = {:?}\ntoken = \
             \"0123456789abcdef0123\"\n[[mirror]]\nvolume = \"vm1\"\nupstream = \"a\"\nevery = \"1h\"\n",
            b.node.state,
            fake.url()
        ),
    )
    .unwrap();
    cfg
}

fn listing_handler(list: Value) -> Handler {
    Arc::new(move |_, path, _| {
        if path.ends_with("/snapshots") {
            json(200, list.clone())
        } else {
            json(404, json!({"kind": "not-found", "message": "no"}))
        }
    })
}

/// Every field of every listed record must fit the relation: a record of another volume, a
/// block size of 0 or another than the replica's, an id listed twice, a label too long or with
/// a terminal escape, a size no manifest can hold. Each is refused with exit 9 before anything
/// is fetched, and nothing changes.
#[test]
fn an_upstream_that_lies_in_its_listing_is_refused() {
    let mib = 1u64 << 20;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "another volume",
            listing(vec![record("vm3", ID1, 256 * mib, 4096, json!({}))]),
            "of volume vm3",
        ),
        (
            "block size 0",
            listing(vec![record("vm1", ID1, mib, 0, json!({}))]),
            "block size",
        ),
        (
            "two block sizes",
            listing(vec![
                record("vm1", ID1, mib, 65536, json!({})),
                record("vm1", ID2, mib, 4096, json!({})),
            ]),
            "block size 4096",
        ),
        (
            "an id twice",
            listing(vec![
                record("vm1", ID1, mib, 65536, json!({})),
                record("vm1", ID1, mib, 65536, json!({})),
            ]),
            "twice",
        ),
        (
            "a 200 KB label",
            listing(vec![record(
                "vm1",
                ID1,
                mib,
                65536,
                json!({"k": "x".repeat(200_000)}),
            )]),
            "label",
        ),
        (
            "a terminal escape in a label",
            listing(vec![record(
                "vm1",
                ID1,
                mib,
                65536,
                json!({"k": "\u{1b}[31mred"}),
            )]),
            "control character",
        ),
        (
            "a size no manifest holds",
            listing(vec![record("vm1", ID1, u64::MAX / 2, 4096, json!({}))]),
            "cannot be held",
        ),
        (
            // It would sort after everything the upstream ever makes: the replica would
            // stop following (and report up-to-date) for good.
            "an id from the far future",
            listing(vec![record(
                "vm1",
                "ffffffffffff00000001",
                mib,
                65536,
                json!({}),
            )]),
            "h from now",
        ),
    ];
    for (what, list, says) in cases {
        let (r, n, fake) = mirror_against(listing_handler(list));
        assert_eq!(r.code, 9, "{what}: {}", r.stderr);
        assert!(
            r.stderr.contains("upstream fake sent") && r.stderr.contains(says),
            "{what}: {}",
            r.stderr
        );
        assert!(
            !r.stderr.contains('\u{1b}'),
            "{what}: a raw escape was printed"
        );
        assert_eq!(
            fake.requests()
                .iter()
                .filter(|q| !q.contains("/snapshots"))
                .count(),
            0,
            "{what}: fetched after a bad listing: {:?}",
            fake.requests()
        );
        changed_nothing(&n);
    }
}

/// Answers are bounded while they stream in: an 80 MiB listing is cut off at the limit (the
/// downstream does not buffer it), exit 9.
#[test]
fn an_oversized_answer_is_refused_while_it_streams() {
    let (r, n, _fake) = mirror_against(Arc::new(|_, _, _| endless(80 << 20, b' ')));
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert!(r.stderr.contains("at most"), "{}", r.stderr);
    changed_nothing(&n);
}

/// A redirect is never followed (it could lead the token elsewhere).
#[test]
fn a_redirect_is_not_followed() {
    let elsewhere = FakeUpstream::start(Arc::new(|_, _, _| {
        json(
            200,
            listing(vec![record("vm1", ID1, 1 << 20, 65536, json!({}))]),
        )
    }));
    let to = format!("{}/v1/volumes/vm1/snapshots", elsewhere.url());
    let (r, n, _fake) = mirror_against(Arc::new(move |_, _, _| {
        axum::response::Response::builder()
            .status(307)
            .header("location", to.clone())
            .body(axum::body::Body::empty())
            .unwrap()
    }));
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("307"), "{}", r.stderr);
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
    changed_nothing(&n);
}

/// A lock-set reply claiming the highest generation cannot overflow the next one: exit 9.
#[test]
fn a_lock_set_reply_at_the_last_generation_is_refused() {
    let list = listing(vec![record("vm1", ID1, 1 << 20, 65536, json!({}))]);
    let (r, n, _fake) = mirror_against(Arc::new(move |method, path, _| {
        if path.ends_with("/snapshots") {
            json(200, list.clone())
        } else if method == "PUT" && path.ends_with("/locks") {
            json(
                200,
                json!({"outcome": "ignored-stale", "generation": 1, "stored": u64::MAX}),
            )
        } else {
            json(404, json!({"kind": "not-found", "message": "no"}))
        }
    }));
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert!(r.stderr.contains("generation"), "{}", r.stderr);
    changed_nothing(&n);
}

/// A lock-set reply that cannot be read is not a refusal: a refusal makes a node send its
/// own locks again without its downstreams' (which would release theirs upstream), while a
/// reply nobody can read says nothing about whether the set was taken. The update stops as
/// "unavailable" (exit 7), and no second set is sent.
#[test]
fn an_unreadable_lock_set_reply_is_not_taken_for_a_refusal() {
    let list = listing(vec![record("vm1", ID1, 1 << 20, 65536, json!({}))]);
    let (r, n, fake) = mirror_against(Arc::new(move |method, path, _| {
        if path.ends_with("/snapshots") {
            json(200, list.clone())
        } else if method == "PUT" && path.ends_with("/locks") {
            axum::response::Response::builder()
                .header("content-type", "text/html")
                .body(axum::body::Body::from("<html>proxy says hello</html>"))
                .unwrap()
        } else {
            json(404, json!({"kind": "not-found", "message": "no"}))
        }
    }));
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(r.stderr.contains("cannot be read"), "{}", r.stderr);
    let puts = fake
        .requests()
        .iter()
        .filter(|q| q.starts_with("PUT"))
        .count();
    assert_eq!(puts, 1, "{:?}", fake.requests());
    changed_nothing(&n);
}

/// A refused update leaves nothing behind, not even an empty replica: a first listing whose
/// block size (4 KiB) and region passed the listing's checks, followed by a manifest that is
/// refused, does not pin the replica to them, and the next update, from the real upstream
/// (64 KiB blocks, no region), succeeds.
#[test]
fn a_refused_first_update_leaves_no_replica_behind() {
    let (_tls, a, b) = pair();
    let mut list = listing(vec![record("vm1", ID1, 1 << 20, 4096, json!({}))]);
    list["region"] = json!("r1");
    let fake = FakeUpstream::start(Arc::new(move |method, path, _| {
        if path.ends_with("/snapshots") {
            json(200, list.clone())
        } else if method == "PUT" {
            lock_set_taken()
        } else {
            // Not a manifest in format 2: refused after the listing passed.
            axum::response::Response::builder()
                .header("x-holdfast-manifest", "full")
                .body(axum::body::Body::from(vec![0u8; 100]))
                .unwrap()
        }
    }));
    let cfg = pointed_at(&b, &fake);
    let r = b
        .node
        .run(&["mirror", "run", "vm1", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert!(r.stderr.contains("format 2"), "{}", r.stderr);
    let vols = b.node.run(&["volume", "list", "--json"]).json();
    assert_eq!(vols, json!([]), "a refused update left a volume behind");
    let r = b.mirror("vm1");
    assert_eq!(r["kind"], "baseline", "{r}");
    assert_eq!(b.ids("vm1"), vec![a.node.snapshot_id("vm1@s1")]);
    b.node.ok(&["verify"]);
}

/// What an upstream's error may look like: a window-title escape, a bell, a screen clear, a
/// right-to-left override, and 60 KB more.
fn evil_text() -> String {
    format!(
        "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{202e}desrever\u{2066}{}",
        "x".repeat(60_000)
    )
}

/// Text printed from an upstream's error: escaped (no raw escape, bell or bidi mark), and cut
/// short.
fn assert_printable(what: &str, text: &str) {
    assert_no_raw(what, text);
    assert!(text.len() < 4096, "{what}: {} bytes printed", text.len());
}

fn assert_no_raw(what: &str, text: &str) {
    let raw = text.chars().find(|&c| {
        c == '\u{1b}'
            || c == '\u{7}'
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    });
    assert!(raw.is_none(), "{what}: {raw:?} printed raw: {text:?}");
}

/// An upstream's error answer is text from outside: its terminal escapes and bidi marks are
/// printed escaped and it is cut short. Its `kind` chooses the exit code only as far as a peer
/// may: "not found" (3) and a refusal (9); its own corrupt data, policy or internal error is
/// the upstream failing to answer (7), never this node's data (6), policy (8) or bug (70). A
/// body that is not JSON is shown the same way.
#[test]
fn an_upstream_error_is_printed_escaped_and_cannot_choose_the_exit_code() {
    let cases = [
        ("internal", 7),
        ("policy", 7),
        ("corrupt", 7),
        ("locked", 7),
        ("conflict", 7),
        ("made-up", 7),
        ("unavailable", 7),
        ("invalid", 9),
        ("denied", 9),
        ("not-found", 3),
    ];
    for (kind, code) in cases {
        let (r, n, _fake) = mirror_against(Arc::new(move |_, _, _| {
            json(500, json!({"kind": kind, "message": evil_text()}))
        }));
        assert_eq!(r.code, code, "{kind}: {}", r.stderr);
        assert_printable(kind, &r.stderr);
        assert!(r.stderr.contains("\\u{1b}]0;pwned"), "{kind}: {}", r.stderr);
        changed_nothing(&n);
    }
    let (r, n, _fake) = mirror_against(Arc::new(|_, _, _| {
        axum::response::Response::builder()
            .status(502)
            .body(axum::body::Body::from(evil_text()))
            .unwrap()
    }));
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert_printable("a body that is not JSON", &r.stderr);
    assert!(r.stderr.contains("502"), "{}", r.stderr);
    changed_nothing(&n);
}

/// A daemon node whose one mirror (vm1, every `every`) pulls from `upstream`.
fn daemon_downstream(tls: &Tls, upstream: &str, every: &str) -> Peer {
    let b = Peer::new("b");
    std::fs::write(
        &b.config,
        format!(
            "state = {:?}\n[listen]\naddress = \"127.0.0.1:{}\"\ntls_cert = {:?}\ntls_key = {:?}\n\
             [[upstream]]\nname = \"fake\"\nurl = {upstream:?}\ntoken = \"0123456789abcdef0123\"\n\
             [[mirror]]\nvolume = \"vm1\"\nupstream = \"fake\"\nevery = {every:?}\n",
            b.node.state, b.port, tls.cert, tls.key
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &b.config,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    b
}

/// Waits until the daemon's mirror job has failed `n` times; returns `status --json`.
fn wait_for_failures(b: &Peer, n: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let s = b.status();
        let job = &s["relations"][0]["job"];
        if job["failures"].as_u64().unwrap_or(0) >= n {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the mirror job did not fail {n} time(s): {s}\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon's `status` shows a failed mirror's error, which an upstream wrote, escaped and
/// cut short; its log does too.
#[test]
fn status_shows_an_upstreams_error_escaped() {
    let tls = Tls::new();
    let fake = FakeUpstream::start(Arc::new(|_, _, _| {
        json(500, json!({"kind": "internal", "message": evil_text()}))
    }));
    let mut b = daemon_downstream(&tls, &fake.url(), "1h");
    b.start();
    wait_for_failures(&b, 1);
    let r = b.node.run(&["status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("pwned"), "{}", r.stdout);
    assert_printable("status", &r.stdout);
    assert_no_raw("the daemon's log", &b.log());
}

/// A fake upstream's answer to one request.
type Answer = Arc<dyn Fn() -> axum::response::Response + Send + Sync>;

/// The most a refused `mirror run` may take in these tests: far below what the bombs claim.
const BOMB_RSS_BOUND: u64 = 150 << 20;

/// A listing that claims the most blocks a snapshot may have (2^25 of 64 KiB) lets a whole
/// manifest be a gigabyte; an upstream that sends 600 MB of something else, or a valid header
/// and bitmap followed by more ids than its bitmap says, is refused as soon as the first bytes
/// show it: the downstream's peak memory stays far below what was sent.
#[test]
fn a_manifest_bomb_is_refused_before_it_is_buffered() {
    let size = (1u64 << 25) * 65536;
    let list = listing(vec![record("vm1", ID1, size, 65536, json!({}))]);
    // Magic, header, an all-zero bitmap (4 MiB): a manifest of exactly that plus a checksum.
    let header = json!({"format": 2, "id": ID1, "volume": "vm1", "name": format!("s-{ID1}"),
        "created-unix-ms": 1, "size": size, "block-size": 65536, "labels": {}, "parent": null})
    .to_string();
    let mut valid_start = b"HFMNFST2".to_vec();
    valid_start.extend_from_slice(&(header.len() as u32).to_le_bytes());
    valid_start.extend_from_slice(header.as_bytes());
    valid_start.extend_from_slice(&vec![0u8; (1 << 25) / 8]);
    let cases: Vec<(&str, Answer)> = vec![
        (
            "600 MB that are no manifest",
            Arc::new(|| endless(600 << 20, b'x')),
        ),
        (
            // A first mirror asks for no base: a delta is refused before its body is read.
            "600 MB labelled a delta",
            Arc::new(|| {
                let mut r = endless(600 << 20, b'x');
                r.headers_mut()
                    .insert("x-holdfast-manifest", "delta".parse().unwrap());
                r
            }),
        ),
        (
            "a valid start and 600 MB more",
            Arc::new(move || {
                let start = axum::body::Bytes::from(valid_start.clone());
                let piece = axum::body::Bytes::from(vec![7u8; 1 << 20]);
                let rest = (0..600).map(move |_| Ok::<_, std::io::Error>(piece.clone()));
                let stream = futures::stream::iter(
                    std::iter::once(Ok::<_, std::io::Error>(start)).chain(rest),
                );
                axum::response::Response::builder()
                    .header("x-holdfast-manifest", "full")
                    .body(axum::body::Body::from_stream(stream))
                    .unwrap()
            }),
        ),
    ];
    for (what, answer) in cases {
        let list = list.clone();
        let fake = FakeUpstream::start(Arc::new(move |method, path, _| {
            if path.ends_with("/snapshots") {
                json(200, list.clone())
            } else if method == "PUT" {
                lock_set_taken()
            } else {
                answer()
            }
        }));
        let (n, cfg) = downstream(&fake.url());
        let (code, stderr, peak) = holdfast_tests::peak_rss(
            &n.state,
            &["mirror", "run", "vm1", "--config", cfg.to_str().unwrap()],
        );
        eprintln!("{what}: mirror run peak RSS {peak} bytes");
        assert_eq!(code, 9, "{what}: {stderr}");
        assert!(stderr.contains("upstream fake"), "{what}: {stderr}");
        assert!(
            peak < BOMB_RSS_BOUND,
            "{what}: mirror run took {peak} bytes"
        );
        changed_nothing(&n);
    }
}

/// A manifest delta is parsed as it decompresses: 50 KB of zstd that inflate to 600 MB of
/// changes that cannot be (all block 0) are refused at the second change, and the
/// downstream's memory stays put.
#[test]
fn a_delta_bomb_is_refused_as_it_decompresses() {
    let (_tls, a, b) = pair();
    b.mirror("vm1");
    let s1 = b.node.run(&["snapshot", "list", "vm1", "--json"]).json()[0].clone();
    let id1 = s1["id"].as_str().unwrap().to_string();
    let id2 = format!("{:020x}", u128::from_str_radix(&id1, 16).unwrap() + 1);
    let size = (1u64 << 25) * 65536;
    let mut s2 = record("vm1", &id2, size, 65536, json!({}));
    s2["name"] = json!("s2");
    let list = json!({"node": "a", "volume": "vm1", "snapshots": [s1, s2]});
    let header = json!({"format": 2, "id": id2, "volume": "vm1", "name": "s2",
        "created-unix-ms": 1, "size": size, "block-size": 65536, "labels": {}, "parent": null})
    .to_string();
    let mut raw = b"HFMDLTA1".to_vec();
    raw.extend_from_slice(&u128::from_str_radix(&id1, 16).unwrap().to_le_bytes());
    raw.extend_from_slice(&[0u8; 32]);
    raw.extend_from_slice(&(header.len() as u32).to_le_bytes());
    raw.extend_from_slice(header.as_bytes());
    raw.extend_from_slice(&(1u64 << 25).to_le_bytes());
    raw.resize(raw.len() + (600 << 20), 0);
    let bomb = zstd::bulk::compress(&raw, 3).unwrap();
    drop(raw);
    eprintln!("the delta bomb: {} bytes of zstd", bomb.len());
    let fake = FakeUpstream::start(Arc::new(move |method, path, _| {
        if path.ends_with("/snapshots") {
            json(200, list.clone())
        } else if method == "PUT" {
            lock_set_taken()
        } else if path.contains("base=") {
            axum::response::Response::builder()
                .header("x-holdfast-manifest", "delta")
                .body(axum::body::Body::from(bomb.clone()))
                .unwrap()
        } else {
            json(404, json!({"kind": "not-found", "message": "no"}))
        }
    }));
    let cfg = pointed_at(&b, &fake);
    let (code, stderr, peak) = holdfast_tests::peak_rss(
        &b.node.state,
        &["mirror", "run", "vm1", "--config", cfg.to_str().unwrap()],
    );
    eprintln!("a delta bomb: mirror run peak RSS {peak} bytes");
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("out of order"), "{stderr}");
    assert!(peak < BOMB_RSS_BOUND, "mirror run took {peak} bytes");
    assert_eq!(b.ids("vm1"), vec![id1]);
    b.node.ok(&["verify"]);
    drop(a);
}

/// A listing of four million tiny labels (under the listing's byte limit, ten times that once
/// parsed) is refused while it is parsed, and so is one snapshot with more labels than a
/// snapshot may carry.
#[test]
fn a_listing_of_countless_labels_is_refused_while_it_is_parsed() {
    let labels = |n: usize| -> String {
        let l: Vec<String> = (0..n).map(|i| format!("\"{i:x}\":\"\"")).collect();
        format!("{{{}}}", l.join(","))
    };
    let listing_of = |records: Vec<String>| -> String {
        format!(
            "{{\"node\":\"fake\",\"volume\":\"vm1\",\"snapshots\":[{}]}}",
            records.join(",")
        )
    };
    let rec = |id: &str, labels: &str| -> String {
        let mut r = record("vm1", id, 1 << 20, 65536, json!({})).to_string();
        r = r.replace("\"labels\":{}", &format!("\"labels\":{labels}"));
        r
    };
    let per_snapshot = listing_of(vec![rec(ID1, &labels(300))]);
    let many = labels(256);
    let in_all = listing_of(
        (0..16_000u64)
            .map(|i| rec(&format!("{:020x}", 0x1000_0000_0000u128 + i as u128), &many))
            .collect(),
    );
    for (what, body, says) in [
        (
            "300 labels on one snapshot",
            per_snapshot,
            "more than 256 labels",
        ),
        ("four million labels in all", in_all, "in all"),
    ] {
        eprintln!("{what}: a listing of {} bytes", body.len());
        let fake = FakeUpstream::start(Arc::new(move |_, path, _| {
            if path.ends_with("/snapshots") {
                axum::response::Response::builder()
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(body.clone()))
                    .unwrap()
            } else {
                json(404, json!({"kind": "not-found", "message": "no"}))
            }
        }));
        let (n, cfg) = downstream(&fake.url());
        let (code, stderr, peak) = holdfast_tests::peak_rss(
            &n.state,
            &["mirror", "run", "vm1", "--config", cfg.to_str().unwrap()],
        );
        eprintln!("{what}: mirror run peak RSS {peak} bytes");
        assert_eq!(code, 9, "{what}: {}", shorten(&stderr));
        assert!(stderr.contains(says), "{what}: {}", shorten(&stderr));
        assert!(
            peak < BOMB_RSS_BOUND,
            "{what}: mirror run took {peak} bytes"
        );
        changed_nothing(&n);
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(2000).collect()
}

/// Without a metrics token, `/metrics` names the node's volumes and peers to this host only:
/// a client from another address (this machine's own non-loopback address, connecting to the
/// loopback listener) is refused and learns no name. A scrape earns no trust: a connection
/// that only scrapes is closed after the handshake timeout, not kept for the idle one.
#[test]
fn metrics_without_a_token_are_for_this_host_only() {
    let (tls, a, b) = pair();
    b.mirror("vm1");
    let (status, body) = a.request(&tls, "GET", "/metrics", "", "", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("vm1"), "{body}");
    let script = r#"
import socket, ssl, subprocess, sys, time
port, cafile, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["http/1.1"])
raw = socket.socket()
if mode == "other":
    ips = [ip for ip in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split() if "." in ip and not ip.startswith("127.")]
    if not ips:
        print("no-address"); sys.exit(0)
    raw.bind((ips[0], 0))
raw.settimeout(5)
raw.connect(("127.0.0.1", port))
s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
def get():
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        piece = s.recv(65536)
        if not piece: return None
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += s.recv(65536)
    return head.split(b"\r\n")[0].decode() + "\n" + body.decode(errors="replace")
if mode == "other":
    print(get())
else:
    t0 = time.time()
    while time.time() - t0 < 40:
        try:
            if get() is None: break
        except OSError:
            break
        time.sleep(2)
    print(round(time.time() - t0))
"#;
    let run = |mode: &str| -> String {
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(a.port.to_string())
            .arg(&tls.cert)
            .arg(mode)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let other = run("other");
    if other.trim() == "no-address" {
        eprintln!("this machine has no non-loopback IPv4 address: the stranger's part is skipped");
    } else {
        assert!(other.starts_with("HTTP/1.1 403"), "{other}");
        assert!(other.contains("metrics_token"), "{other}");
        assert!(
            !other.contains("vm1") && !other.contains("\"b\""),
            "{other}"
        );
    }
    let secs: u64 = run("scrape").trim().parse().expect("seconds");
    assert!(secs < 30, "a scraping connection was kept for {secs} s");
}

/// A peer asking again and again for a volume it is not granted is refused every time, and
/// logged at most once a second (with a count of what was left out), not once a request.
#[test]
fn refusals_of_ungranted_volumes_are_logged_once_a_second() {
    let (tls, a, b) = pair();
    let script = r#"
import http.client, ssl, sys
port, cafile, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
codes = []
for i in range(100):
    c.request("GET", "/v1/volumes/vm2/snapshots", headers={"Authorization": "Bearer " + token, "X-Holdfast-Peer": "b"})
    r = c.getresponse(); r.read(); codes.append(r.status)
print(" ".join(map(str, sorted(set(codes)))))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(a.port.to_string())
        .arg(&tls.cert)
        .arg(&b.token)
        .output()
        .expect("python3");
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        codes.trim() == "403",
        "{codes} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = a.log();
    let lines = log.lines().filter(|l| l.contains("not granted")).count();
    assert!(
        (1..=6).contains(&lines),
        "{lines} log lines for 100 refusals:\n{log}"
    );
}

/// A mirror job that panics (a test-only failure point) is a failed run: the daemon lives on,
/// `status` reports the panic, and the job runs again at its next time and succeeds.
#[test]
fn a_panicking_mirror_job_is_reported_and_run_again() {
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let mut b = Peer::new("b");
    let img = a.node.image("vm1.img", &mixed_bytes(1 << 20, 5));
    a.node.add_volume("vm1", &img, "64KiB");
    a.node.snapshot("vm1", "s1");
    a.configure(
        &tls,
        Relations {
            downstreams: vec![(&b, vec!["vm1"], "")],
            ..Default::default()
        },
    );
    b.configure(
        &tls,
        Relations {
            upstream: Some((&a, "vm1")),
            mirror_every: Some("3s"),
            ..Default::default()
        },
    );
    a.start();
    b.start_with_env(&[("HOLDFAST_FAILPOINT", "mirror-panic")]);
    let failed = wait_for_failures(&b, 1);
    let job = &failed["relations"][0]["job"];
    assert_eq!(job["last-ok"], false, "{failed}");
    let error = job["last-error"].as_str().unwrap_or_default();
    assert!(
        error.contains("panicked") && error.contains("mirror-panic"),
        "{failed}"
    );
    let text = b.node.run(&["status"]).stdout;
    assert!(
        text.contains("FAILED") && text.contains("panicked"),
        "{text}"
    );
    // The next scheduled run succeeds.
    let t0 = Instant::now();
    loop {
        let s = b.status();
        let job = &s["relations"][0]["job"];
        if job["last-ok"] == true {
            assert!(job["runs"].as_u64().unwrap_or(0) >= 2, "{s}\n{}", b.log());
            assert_eq!(job["failures"], 1, "{s}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the job did not run again: {s}\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(b.ids("vm1"), vec![a.node.snapshot_id("vm1@s1")]);
    assert!(b.pid().is_some());
    b.node.ok(&["verify"]);
}

/// Eight addresses of strangers cannot take every connection: the last 64 of the 512 are kept
/// for addresses a peer authenticated from, so B, which mirrored before, is served while 512
/// half-open connections from 127.0.0.2 to 127.0.0.9 wait for their handshake timeout.
#[test]
fn strangers_from_eight_addresses_cannot_take_every_connection() {
    let (_tls, a, b) = pair();
    b.mirror("vm1");
    let script = r#"
import socket, sys, time
port = int(sys.argv[1])
socks = []
for host in range(2, 10):
    for _ in range(64):
        s = socket.socket()
        s.bind(("127.0.0.%d" % host, 0))
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
time.sleep(0.5)
alive = 0
for s in socks:
    try:
        if s.recv(1) != b"":
            alive += 1
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(alive)
sys.stdout.flush()
time.sleep(6)
"#;
    let flood = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(a.port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let r = b.mirror_run("vm1");
    let secs = t0.elapsed();
    let out = flood.wait_with_output().unwrap();
    let held: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("count");
    assert_eq!(
        r.code, 0,
        "B was not served while strangers held {held}: {}",
        r.stderr
    );
    assert!(secs < Duration::from_secs(5), "B waited {secs:?}");
    assert!(held <= 512 - 64, "strangers held {held} connections");
}

/// A -> B over TLS, B mirrors vm1 from A; returns (tls, a, b).
fn pair() -> (Tls, Peer, Peer) {
    pair_of(2 << 20)
}

/// [`pair`], with a volume of `size` bytes (64 KiB blocks) and its snapshot s1 on A.
fn pair_of(size: usize) -> (Tls, Peer, Peer) {
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let b = Peer::new("b");
    let img = a.node.image("vm1.img", &mixed_bytes(size, 7));
    a.node.add_volume("vm1", &img, "64KiB");
    a.node.snapshot("vm1", "s1");
    a.configure(
        &tls,
        Relations {
            downstreams: vec![(&b, vec!["vm1"], "")],
            ..Default::default()
        },
    );
    b.configure(
        &tls,
        Relations {
            upstream: Some((&a, "vm1")),
            ..Default::default()
        },
    );
    a.start();
    (tls, a, b)
}

/// Names cannot be tried out: an unknown peer and a known one with a wrong token get the same
/// answer. A lock set whose locks came through more nodes than a cascade has, or bigger than a
/// lock set can be, is refused and stored nowhere.
#[test]
fn strangers_learn_nothing_and_oversized_lock_sets_are_refused() {
    let (tls, a, b) = pair();
    let path = "/v1/volumes/vm1/snapshots";
    let unknown = a.request(&tls, "GET", path, "mallory", "0123456789abcdef", "");
    let wrong = a.request(&tls, "GET", path, "b", "0123456789abcdef", "");
    assert_eq!(unknown.0, 403);
    assert_eq!(
        unknown, wrong,
        "an unknown peer and a wrong token are told apart"
    );

    let snap = a.node.snapshot_id("vm1@s1");
    let deep: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
    let set = json!({"volume": "vm1", "holder": "b/vm1", "generation": 1, "locks": [
        {"snapshot": snap, "type": "owner-name", "value": "x", "path": deep}]});
    let (status, body) = a.request(
        &tls,
        "PUT",
        "/v1/volumes/vm1/locks",
        "b",
        &b.token,
        &set.to_string(),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("deep"), "{body}");
    let huge = json!({"volume": "vm1", "holder": "b/vm1", "generation": 2, "locks": [
        {"snapshot": snap, "type": "owner-name", "value": "x".repeat(5 << 20), "path": []}]});
    let (status, _) = a.request(
        &tls,
        "PUT",
        "/v1/volumes/vm1/locks",
        "b",
        &b.token,
        &huge.to_string(),
    );
    assert_eq!(status, 413);
    assert!(a.locks().is_empty(), "{:?}", a.locks());
    b.mirror("vm1");
}

/// A downstream that sends lock sets faster than the upstream takes them (5 a second, 22 in a
/// burst for a downstream granted one volume) is asked to slow down (503, "slow down") instead of making it write its catalog for
/// each; the upstream goes on serving, and the same downstream's next update succeeds.
#[test]
fn a_downstream_that_floods_lock_sets_is_asked_to_slow_down() {
    let (tls, a, b) = pair();
    let snap = a.node.snapshot_id("vm1@s1");
    let script = r#"
import http.client, json, ssl, sys
host, port, token, cafile, snap = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=cafile)
c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
codes, said = [], ""
for g in range(1, 61):
    body = json.dumps({"volume": "vm1", "holder": "b/vm1", "generation": g,
        "locks": [{"snapshot": snap, "type": "owner-name", "value": "x", "path": ["b"]}]})
    c.request("PUT", "/v1/volumes/vm1/locks", body=body, headers={
        "Authorization": "Bearer " + token, "X-Holdfast-Peer": "b",
        "Content-Type": "application/json"})
    r = c.getresponse(); text = r.read().decode(errors="replace"); codes.append(r.status)
    if r.status != 200 and not said:
        said = text
print(" ".join(map(str, codes)))
print(said)
"#;
    let url = a.url();
    let hostport = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([host, port, &b.token, tls.cert.to_str().unwrap(), &snap])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (first, said) = text.split_once('\n').unwrap();
    let codes: Vec<u16> = first
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    let slowed = codes.iter().filter(|c| **c == 503).count();
    assert!(said.contains("slow down"), "{said}");
    let taken = codes.iter().filter(|c| **c == 200).count();
    eprintln!("60 lock sets at once: {taken} taken, {slowed} asked to slow down");
    assert!(slowed >= 20, "{codes:?}");
    assert!(taken >= 20, "{codes:?}");
    b.mirror("vm1");
}

/// Sends `n` requests with `bytes`-byte bodies and no credentials at once (HTTP/1.1 over TLS,
/// as a stranger would); returns the statuses.
fn unauthenticated_bodies(a: &Peer, tls: &Tls, n: usize, bytes: usize) -> Vec<String> {
    let script = r#"
import socket, ssl, sys, threading
port, cafile, n, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["http/1.1"])
out = []
def one():
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="127.0.0.1")
    s.sendall(("PUT /v1/volumes/vm1/locks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size).encode())
    piece = b"x" * (1 << 20)
    sent = 0
    try:
        s.settimeout(0.001)
        while sent < size:
            try:
                data = s.recv(4096)
                if data:
                    out.append(data.split(b"\r\n")[0].decode()); return
            except (ssl.SSLWantReadError, socket.timeout):
                pass
            s.settimeout(30)
            s.sendall(piece[: min(len(piece), size - sent)]); sent += min(len(piece), size - sent)
            s.settimeout(0.001)
        s.settimeout(30)
        out.append(s.recv(4096).split(b"\r\n")[0].decode())
    except Exception as e:
        out.append("closed after %d bytes" % sent)
threads = [threading.Thread(target=one) for _ in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
print("\n".join(out))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(a.port.to_string())
        .arg(&tls.cert)
        .arg(n.to_string())
        .arg(bytes.to_string())
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A stranger's request body is never read: 16 parallel 60 MB bodies without credentials are
/// answered 403 (or cut off) long before they arrive, and the daemon's memory stays put.
#[test]
fn unauthenticated_bodies_are_not_buffered() {
    let (tls, a, b) = pair();
    let before = a.rss();
    let answers = unauthenticated_bodies(&a, &tls, 16, 60 << 20);
    assert_eq!(answers.len(), 16, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|s| s.contains("403") || s.starts_with("closed after")),
        "{answers:?}"
    );
    let after = a.rss();
    let peak = a.peak_rss();
    eprintln!("daemon RSS before {before} after {after} bytes, peak {peak} bytes");
    assert!(
        peak < before + (100 << 20),
        "the daemon's memory peaked at {peak} bytes (from {before})"
    );
    assert!(
        after < before + (100 << 20),
        "memory grew from {before} to {after} bytes"
    );
    b.mirror("vm1");
    a.node.ok(&["verify"]);
}

/// Connections that never finish a handshake are closed (after the handshake timeout), and
/// one address cannot take more than its share: a flood of 200 from 127.0.0.2 leaves a
/// legitimate peer on 127.0.0.1 served.
#[test]
fn half_open_connections_are_bounded_and_closed() {
    let (_tls, a, b) = pair();
    let script = r#"
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    socks.append(s)
def open_count():
    alive = 0
    for s in socks:
        try:
            if s.recv(1) == b"":
                continue
            alive += 1
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive
time.sleep(1.0)
print(open_count())
sys.stdout.flush()
t0 = time.time()
while time.time() - t0 < 40 and open_count() > 0:
    time.sleep(0.5)
print(open_count(), round(time.time() - t0, 1))
"#;
    let flood = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(a.port.to_string())
        .arg("200")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::thread::sleep(Duration::from_millis(1500));
    // While the flood holds its sockets, a legitimate peer is served.
    let t0 = Instant::now();
    b.mirror("vm1");
    assert!(t0.elapsed() < Duration::from_secs(20));
    let out = flood.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let held: usize = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect(&text);
    assert!(
        held <= 64,
        "{held} connections from one address were kept: {text}"
    );
    let last: Vec<&str> = lines.next().expect(&text).split_whitespace().collect();
    assert_eq!(last[0], "0", "half-open connections stayed open: {text}");
    assert!(
        a.log().contains("closed a connection from 127.0.0.2"),
        "{}",
        a.log()
    );
}

/// State is private whatever the umask: the state directory is 0700 and its files 0600; a
/// token file others can read, or another user owns, is refused, and so is such a TLS key; a
/// configuration with inline tokens that others can read is warned about; a state directory
/// left open by an older release is closed when opened.
#[test]
fn state_and_secrets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let n = TestNode::new();
    let img = n.image("v.img", &mixed_bytes(1 << 20, 1));
    n.add_volume("v", &img, "64KiB");
    n.snapshot("v", "s1");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&n.state), 0o700);
    for entry in walk(&n.state) {
        let m = mode(&entry);
        let want = if entry.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m & 0o077, 0, "{} is {m:o}, want {want:o}", entry.display());
    }
    std::fs::set_permissions(&n.state, std::fs::Permissions::from_mode(0o755)).unwrap();
    n.ok(&["snapshot", "list", "v"]);
    assert_eq!(mode(&n.state), 0o700);

    let token = n.path("token");
    std::fs::write(&token, "0123456789abcdef0123").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = n.path("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "state = {:?}\n[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\ntoken_file = {token:?}\n[[mirror]]\nvolume = \"w\"\nupstream = \"a\"\nevery = \"1h\"\n",
            n.state
        ),
    )
    .unwrap();
    let err = n.fails(
        &["mirror", "run", "w", "--config", cfg.to_str().unwrap()],
        2,
    );
    assert!(err.contains("Run `chmod 600 "), "{err}");

    // A token file another user owns is refused even at 0600: its owner can change it.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let me = std::fs::metadata(&n.state).map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if me.is_ok_and(|uid| uid == 0) {
        std::os::unix::fs::chown(&token, Some(65534), None).unwrap();
        let err = n.fails(
            &["mirror", "run", "w", "--config", cfg.to_str().unwrap()],
            2,
        );
        assert!(err.contains("owned by user 65534"), "{err}");
        assert!(err.contains("chown"), "{err}");
    } else {
        eprintln!("not root: a file owned by another user cannot be made; that part is skipped");
    }

    // A TLS key others can read is refused when the daemon starts.
    let tls = Tls::new();
    std::fs::set_permissions(&tls.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let listen = n.path("listen.toml");
    std::fs::write(
        &listen,
        format!(
            "state = {:?}\n[listen]\naddress = \"127.0.0.1:{}\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            n.state,
            holdfast_tests::cascade::free_port(),
            tls.cert,
            tls.key
        ),
    )
    .unwrap();
    let err = n.fails(&["daemon", "--config", listen.to_str().unwrap()], 2);
    assert!(
        err.contains("TLS private key") && err.contains("chmod 600"),
        "{err}"
    );

    // Inline tokens in a configuration others can read: a loud warning (it still runs).
    let inline = n.path("inline.toml");
    std::fs::write(
        &inline,
        format!(
            "state = {:?}\n[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\ntoken = \"0123456789abcdef0123\"\n[[mirror]]\nvolume = \"w\"\nupstream = \"a\"\nevery = \"1h\"\n",
            n.state
        ),
    )
    .unwrap();
    std::fs::set_permissions(&inline, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = n.run(&["mirror", "list", "--config", inline.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("holds tokens and other users can read it"),
        "{}",
        r.stderr
    );
    std::fs::set_permissions(&inline, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = n.run(&["mirror", "list", "--config", inline.to_str().unwrap()]);
    assert!(!r.stderr.contains("other users can read"), "{}", r.stderr);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// A symbolic link placed inside the repository is never followed: a manifest replaced by a
/// link to a file outside is refused on restore and never served to a peer.
#[test]
fn links_inside_the_repository_are_not_followed() {
    let (_tls, a, b) = pair();
    let id = a.node.snapshot_id("vm1@s1");
    let manifest = a.node.state.join(format!("repo/manifests/vm1/{id}"));
    let secret = a.node.path("secret.txt");
    std::fs::write(&secret, "the contents of /etc/shadow").unwrap();
    std::fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink(&secret, &manifest).unwrap();
    let out = a.node.path("r.img");
    let r = a.node.run(&[
        "snapshot",
        "restore",
        "vm1@s1",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert!(!out.exists());
    let r = b.mirror_run("vm1");
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(!r.stderr.contains("etc/shadow") && !r.stdout.contains("etc/shadow"));
    assert!(b.ids("vm1").is_empty());
}

/// An upstream that answers with a manifest in format 1 (zstd JSON, which a few KiB can
/// inflate to gigabytes) when format 2 was asked for is refused before anything is decoded.
#[test]
fn a_manifest_in_another_format_than_asked_is_refused() {
    let list = listing(vec![record("vm1", ID1, 1 << 20, 65536, json!({}))]);
    // 64 MiB of JSON in a few KiB of zstd.
    let bomb = {
        let raw = vec![b' '; 64 << 20];
        zstd_compress(&raw)
    };
    let (r, n, _fake) = mirror_against(Arc::new(move |method, path, _| {
        if path.ends_with("/snapshots") {
            json(200, list.clone())
        } else if method == "PUT" {
            lock_set_taken()
        } else if path.contains("/manifest") {
            axum::response::Response::builder()
                .header("x-holdfast-manifest", "full")
                .body(axum::body::Body::from(bomb.clone()))
                .unwrap()
        } else {
            json(404, json!({"kind": "not-found", "message": "no"}))
        }
    }));
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert!(r.stderr.contains("format 2"), "{}", r.stderr);
    changed_nothing(&n);
}

fn zstd_compress(raw: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(raw, 19).unwrap()
}

/// A -> B -> C over TLS, each a daemon; B and C mirror vm1.
fn chain() -> (Tls, Peer, Peer, Peer) {
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let mut b = Peer::new("b");
    let c = Peer::new("c");
    let img = a.node.image("vm1.img", &mixed_bytes(1 << 20, 9));
    a.node.add_volume("vm1", &img, "64KiB");
    a.node.snapshot("vm1", "s1");
    cascade::chain(&tls, &[&a, &b, &c], "vm1");
    a.start();
    b.start();
    (tls, a, b, c)
}

/// A downstream cannot stop its upstream from mirroring by what it sends: a lock whose path
/// is too deep to pass on is refused at once (or, just short of that, kept but not passed
/// up); a set that fills its own limit makes the set passed up too big for the next hop,
/// and then the upstream still mirrors, sending its own locks without its downstream's.
#[test]
fn a_downstream_cannot_stop_its_upstream_from_mirroring() {
    let (tls, a, b, c) = chain();
    b.mirror("vm1"); // (B's daemon may have caught up already at its start)
    let snap = b.node.snapshot_id("vm1@s1");
    let path = |n: usize| -> Vec<String> {
        let mut p: Vec<String> = (0..n - 1).map(|i| format!("x{i}")).collect();
        p.push("c".into());
        p
    };
    let set = |generation: u64, locks: Vec<Value>| {
        json!({"volume": "vm1", "holder": "c/vm1", "generation": generation, "locks": locks})
            .to_string()
    };
    let put = |body: String| b.request(&tls, "PUT", "/v1/volumes/vm1/locks", "c", &c.token, &body);
    // Too deep to pass on: refused here.
    let (st, body) = put(set(
        1,
        vec![json!({"snapshot": snap, "type": "owner-name", "value": "deep", "path": path(32)})],
    ));
    assert_eq!(st, 403, "{body}");
    // Deep, but B can still pass it... to the limit: B keeps it, A never sees a set it refuses.
    let (st, body) = put(set(
        2,
        vec![json!({"snapshot": snap, "type": "owner-name", "value": "deep", "path": path(31)})],
    ));
    assert_eq!(st, 200, "{body}");
    let r = b.mirror("vm1");
    assert_eq!(r["kind"], "up-to-date", "{r}");
    // A thousand locks (C's limit on B) make B's set one more than B's limit on A.
    let many: Vec<Value> = (0..1000)
        .map(|i| json!({"snapshot": snap, "type": "owner-name", "value": format!("v{i}"), "path": ["c"]}))
        .collect();
    let (st, body) = put(set(3, many));
    assert_eq!(st, 200, "{body}");
    std::thread::sleep(Duration::from_millis(300));
    let r = b.mirror("vm1");
    assert_eq!(r["kind"], "up-to-date", "{r}");
    // B's own base still holds on A.
    assert_eq!(a.locked_by("b/vm1"), vec![snap.clone()]);
    assert!(b.log().contains("without the"), "{}", b.log());
}

/// A chunk request naming a chunk twice is refused (an answer must not be a multiple of
/// what was asked for).
#[test]
fn a_chunk_request_naming_a_chunk_twice_is_refused() {
    let (tls, a, b) = pair();
    let id = a.node.snapshot_id("vm1@s1");
    let c = "ab".repeat(32);
    let body = json!({"chunks": [c, c]}).to_string();
    let path = format!("/v1/volumes/vm1/snapshots/{id}/chunks");
    let (st, resp) = a.request(&tls, "POST", &path, "b", &b.token, &body);
    assert_eq!(st, 400, "{resp}");
    assert!(resp.contains("twice"), "{resp}");
}

/// A stranger whose requests are all refused does not keep a connection: it is closed after
/// the handshake timeout, however often it asks.
#[test]
fn refused_requests_do_not_keep_a_connection_open() {
    let (tls, a, _b) = pair();
    let script = r#"
import socket, ssl, sys, time
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1")
t0 = time.time()
while time.time() - t0 < 40:
    try:
        s.sendall(b"GET /v1/volumes/vm1/snapshots HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(65536)
        if not data:
            break
    except OSError:
        break
    time.sleep(2)
print(round(time.time() - t0))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(a.port.to_string())
        .arg(&tls.cert)
        .output()
        .expect("python3");
    let secs: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        secs < 30,
        "a refused stranger kept its connection for {secs} s"
    );
}

/// A manifest must be the snapshot it was listed as, in every field of its header: an upstream
/// that lists a snapshot of vm1 and serves a real manifest that differs from the listing in
/// one field only (another volume's snapshot of the same size, or vm1's own snapshot under
/// another id, size or block size) is refused, and nothing is committed. Each case differs in
/// one field so that a check needing several fields to differ fails here.
#[test]
fn a_manifest_that_differs_from_its_listing_in_one_field_is_refused() {
    // A real node whose stored manifests the fake upstream serves.
    let src = TestNode::new();
    for (vol, seed) in [("vm1", 11), ("vm2", 12)] {
        let img = src.image(&format!("{vol}.img"), &mixed_bytes(1 << 20, seed));
        src.add_volume(vol, &img, "64KiB");
        src.snapshot(vol, "s1");
    }
    let id1 = src.snapshot_id("vm1@s1");
    let id2 = src.snapshot_id("vm2@s1");
    let stored = |vol: &str, id: &str| {
        std::fs::read(src.state.join(format!("repo/manifests/{vol}/{id}"))).unwrap()
    };
    let (vm1, vm2) = (stored("vm1", &id1), stored("vm2", &id2));
    let later = format!("{:020x}", u128::from_str_radix(&id1, 16).unwrap() + 1);
    let mib = 1u64 << 20;
    // The size and block size are checked as the manifest streams in (exit 9, before it is
    // buffered), the volume and id once it is decoded (exit 6).
    let listed = "does not match the snapshot it was listed as";
    let cases: Vec<(&str, Value, Vec<u8>, i32, &str)> = vec![
        (
            "another volume",
            record("vm1", &id2, mib, 65536, json!({})),
            vm2,
            6,
            listed,
        ),
        (
            "another id",
            record("vm1", &later, mib, 65536, json!({})),
            vm1.clone(),
            6,
            listed,
        ),
        (
            "another size",
            record("vm1", &id1, 2 * mib, 65536, json!({})),
            vm1.clone(),
            9,
            "not the 2097152 in 65536-byte blocks listed",
        ),
        (
            "another block size",
            record("vm1", &id1, mib, 4096, json!({})),
            vm1,
            9,
            "not the 1048576 in 4096-byte blocks listed",
        ),
    ];
    for (what, rec, manifest, code, says) in cases {
        let list = listing(vec![rec]);
        let (r, n, fake) = mirror_against(Arc::new(move |method, path, _| {
            if path.ends_with("/snapshots") {
                json(200, list.clone())
            } else if method == "PUT" && path.ends_with("/locks") {
                lock_set_taken()
            } else if path.contains("/manifest") {
                axum::response::Response::builder()
                    .header("x-holdfast-manifest", "full")
                    .body(axum::body::Body::from(manifest.clone()))
                    .unwrap()
            } else {
                json(404, json!({"kind": "not-found", "message": "no"}))
            }
        }));
        assert_eq!(r.code, code, "{what}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{what}: {}", r.stderr);
        assert!(
            fake.requests().iter().any(|q| q.contains("/manifest")),
            "{what}: the manifest was never asked for: {:?}",
            fake.requests()
        );
        assert!(
            !fake.requests().iter().any(|q| q.contains("/chunks")),
            "{what}: chunks fetched for a refused manifest: {:?}",
            fake.requests()
        );
        changed_nothing(&n);
    }
}

/// A delta that changes the volume's size must not carry a block over at its old length: the
/// old last block, short, is a whole block once the volume grows, and a whole block becomes
/// the short last one when it shrinks. An upstream that sends a delta changing only the size
/// (every block kept) names a chunk of the wrong length for that block; the replica refuses
/// the update (exit 6, nothing committed) instead of storing a snapshot whose restore would be
/// cut short or too long. A delta whose header disagrees with the listed size is refused too.
#[test]
fn a_delta_that_keeps_a_block_at_its_old_length_across_a_resize_is_refused() {
    use holdfast::id::SnapshotId;
    use holdfast::snapshot::manifest::Manifest;

    // 16 whole blocks and a short 17th of 1000 bytes.
    let size1 = (1u64 << 20) + 1000;
    let (_tls, a, b) = pair_of(size1 as usize);
    assert_eq!(b.mirror("vm1")["kind"], "baseline");
    let id1 = a.node.snapshot_id("vm1@s1");
    let raw = std::fs::read(a.node.state.join(format!("repo/manifests/vm1/{id1}"))).unwrap();
    let m1 = Manifest::decode(&raw, "s1").unwrap();
    assert_eq!(m1.blocks.len(), 17);
    let id2 = SnapshotId::from_u128(m1.id.as_u128() + 1);

    // Grown to 32 whole blocks: block 16 keeps its 1000-byte chunk. Shrunk to 15 whole blocks
    // and a short 16th: block 15 keeps its whole chunk. And a delta whose own header says
    // another size than the listing (checked once it is applied: a delta has no length to
    // check as it streams).
    let grown = {
        let mut m = m1.clone();
        m.size = 2 << 20;
        m.blocks.push_zeros(32 - 17);
        (
            m.size,
            m,
            "block 16 is 65536 bytes, but the chunk".to_string(),
        )
    };
    let shrunk = {
        let mut m = m1.clone();
        m.size = (1 << 20) - 1000;
        m.blocks = m1.blocks.iter().take(16).collect();
        (
            m.size,
            m,
            "block 15 is 64536 bytes, but the chunk".to_string(),
        )
    };
    let mislabelled = (
        2 << 20,
        m1.clone(),
        "does not match the snapshot it was listed as".to_string(),
    );
    // A delta whose header says 32 KiB blocks (the listing, 64 KiB): the same bytes in 33.
    let other_block_size = {
        let mut m = m1.clone();
        m.block_size = 32768;
        m.blocks.push_zeros(33 - 17);
        (
            size1,
            m,
            "does not match the snapshot it was listed as".to_string(),
        )
    };
    for (size2, mut m2, says) in [grown, shrunk, mislabelled, other_block_size] {
        m2.id = id2;
        m2.parent = Some(m1.id);
        let delta = m2.delta_from(&m1).encode().unwrap();
        let list = listing(vec![
            record("vm1", &id1, size1, 65536, json!({})),
            record("vm1", &id2.to_string(), size2, 65536, json!({})),
        ]);
        let fake = FakeUpstream::start(Arc::new(move |method, path, _| {
            if path.ends_with("/snapshots") {
                json(200, list.clone())
            } else if method == "PUT" && path.ends_with("/locks") {
                lock_set_taken()
            } else if path.contains("/manifest") && path.contains("base=") {
                axum::response::Response::builder()
                    .header("x-holdfast-manifest", "delta")
                    .body(axum::body::Body::from(delta.clone()))
                    .unwrap()
            } else {
                json(404, json!({"kind": "not-found", "message": "no"}))
            }
        }));
        let cfg = pointed_at(&b, &fake);
        let r = b
            .node
            .run(&["mirror", "run", "vm1", "--config", cfg.to_str().unwrap()]);
        assert!(
            fake.requests().iter().any(|q| q.contains("base=")),
            "size {size2}: no delta was asked for: {:?}",
            fake.requests()
        );
        assert_eq!(r.code, 6, "size {size2}: {}", r.stderr);
        assert!(r.stderr.contains(&says), "size {size2}: {}", r.stderr);
        assert_eq!(b.ids("vm1"), vec![id1.clone()], "size {size2}: committed");
        b.node.ok(&["verify"]);
    }
    // The real upstream still updates the replica.
    a.node.snapshot("vm1", "s2");
    assert_eq!(b.ids("vm1").len(), 1);
    b.mirror("vm1");
    assert_eq!(b.ids("vm1").len(), 2);
}

/// A fake upstream serving one synthetic snapshot of vm1, named `s-ID`, of `blocks` blocks of
/// 4 KiB of distinct random data, 256 chunks a request; the request for the chunk of block
/// `held` (if any), and with `hold_lock_set` the lock set, are answered only once `released`
/// is set. It logs each chunk asked for.
struct Synthetic {
    fake: FakeUpstream,
    id: holdfast::id::SnapshotId,
    ids: Vec<holdfast::id::ChunkId>,
    data: Vec<Vec<u8>>,
    /// The manifest as it is served (and as the downstream stores it).
    manifest: holdfast::snapshot::Manifest,
    released: Arc<std::sync::atomic::AtomicBool>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    asked: Arc<std::sync::Mutex<Vec<holdfast::id::ChunkId>>>,
}

fn synthetic_upstream(blocks: usize, held: Option<usize>, hold_lock_set: bool) -> Synthetic {
    use holdfast::id::{ChunkId, SnapshotId};
    use holdfast::snapshot::{BlockList, MANIFEST_FORMAT, Manifest};
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;

    let data: Vec<Vec<u8>> = (0..blocks as u64)
        .map(|i| {
            let mut b = vec![0u8; 4096];
            blake3::Hasher::new()
                .update(&i.to_le_bytes())
                .finalize_xof()
                .fill(&mut b);
            b
        })
        .collect();
    let ids: Vec<ChunkId> = data
        .iter()
        .map(|b| ChunkId(*blake3::hash(b).as_bytes()))
        .collect();
    let by_id: Arc<HashMap<ChunkId, Vec<u8>>> =
        Arc::new(ids.iter().copied().zip(data.iter().cloned()).collect());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let id = SnapshotId::from_u128((now_ms << 32) | 1);
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id,
        volume: "vm1".parse().unwrap(),
        name: format!("s-{id}").parse().unwrap(),
        created_unix_ms: now_ms as u64,
        size: (blocks * 4096) as u64,
        block_size: 4096,
        labels: Default::default(),
        parent: None,
        blocks: ids.iter().map(|i| Some(*i)).collect::<BlockList>(),
    };
    let served = manifest.encode().unwrap();
    let list = listing(vec![record(
        "vm1",
        &id.to_string(),
        (blocks * 4096) as u64,
        4096,
        json!({}),
    )]);
    let held = held.map(|b| ids[b]);
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked: Arc<std::sync::Mutex<Vec<ChunkId>>> = Arc::default();
    let (rel, reqs, log) = (released.clone(), requests.clone(), asked.clone());
    let fake = FakeUpstream::start(Arc::new(move |method, path, body| {
        if path.ends_with("/snapshots") {
            json(200, list.clone())
        } else if method == "PUT" && path.ends_with("/locks") {
            let reply = json!({"outcome": "replaced", "generation": 1, "locks": 1, "released": 0});
            let rel = rel.clone();
            let body = futures::stream::once(async move {
                while hold_lock_set && !rel.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, std::io::Error>(axum::body::Bytes::from(reply.to_string()))
            });
            axum::response::Response::builder()
                .header("content-type", "application/json")
                .body(axum::body::Body::from_stream(body))
                .unwrap()
        } else if path.contains("/manifest") {
            axum::response::Response::builder()
                .header("x-holdfast-manifest", "full")
                .body(axum::body::Body::from(served.clone()))
                .unwrap()
        } else if path.contains("/chunks") {
            let req: holdfast::peer::ChunkRequest = serde_json::from_slice(body).unwrap();
            let mut out = Vec::new();
            for c in &req.chunks {
                let b = &by_id[c];
                holdfast::peer::write_frame(
                    &mut out,
                    c,
                    holdfast::chunk::Encoding::Raw,
                    b.len() as u32,
                    b,
                );
            }
            let wait = held.is_some_and(|h| req.chunks.contains(&h));
            log.lock().unwrap().extend(req.chunks);
            reqs.fetch_add(1, Ordering::SeqCst);
            let rel = rel.clone();
            let body = futures::stream::once(async move {
                while wait && !rel.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, std::io::Error>(axum::body::Bytes::from(out))
            });
            axum::response::Response::new(axum::body::Body::from_stream(body))
        } else {
            json(404, json!({"kind": "not-found", "message": "no"}))
        }
    }));
    Synthetic {
        fake,
        id,
        ids,
        data,
        manifest,
        released,
        requests,
        asked,
    }
}

/// Sends SIGTERM to a running holdfast and waits for it (killed, and the test failed, if it
/// is still running after `within`); returns its exit code and stderr.
fn stop(mut child: std::process::Child, within: Duration) -> (Option<i32>, String) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > within {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running {within:?} after SIGTERM: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fetch of a snapshot's chunks from an upstream that holds back one answer: no more than
/// four requests are ever out or answered and waiting (the fetch's concurrency; memory stays
/// bounded whatever the upstream does), and a stop (SIGTERM) then stores what arrived in order
/// before it (made durable, nothing committed), so that the next run fetches only the rest.
/// A synthetic snapshot of 2560 blocks of 4 KiB, 256 chunks a request: ten requests.
#[test]
fn a_held_back_answer_bounds_the_requests_out_and_a_stop_keeps_what_came_before_it() {
    use std::sync::atomic::Ordering;
    const BLOCKS: usize = 2560;
    // The third request (from block 512) is held.
    let up = synthetic_upstream(BLOCKS, Some(512), false);
    let (n, cfg) = downstream(&up.fake.url());
    let cfg = cfg.to_str().unwrap().to_string();
    let mut child = n.spawn(&["mirror", "run", "vm1", "--config", &cfg]);
    // Answered: the first two (stored), the fourth to sixth (waiting for the third's turn);
    // the third held: six requests, and no seventh however long the third takes.
    let t0 = Instant::now();
    while up.requests.load(Ordering::SeqCst) < 6 && t0.elapsed() < Duration::from_secs(60) {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the mirror ended early: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        6,
        "chunk requests out or waiting while one is held back"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the mirror ended early"
    );
    let (code, stderr) = stop(child, Duration::from_secs(60));
    assert_eq!(code, Some(7), "{stderr}");
    assert!(
        stderr.contains("interrupted") && stderr.contains("chunks fetched for it are kept"),
        "{stderr}"
    );
    n.ok(&["verify"]);

    // The next run fetches what did not arrive in order before the held answer, once each.
    up.released.store(true, Ordering::SeqCst);
    let first = std::mem::take(&mut *up.asked.lock().unwrap());
    assert_eq!(first.len(), 6 * 256);
    let r = n.run(&["mirror", "run", "vm1", "--config", &cfg]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut second = up.asked.lock().unwrap().clone();
    second.sort();
    let mut rest = up.ids[512..].to_vec();
    rest.sort();
    assert_eq!(
        second.len(),
        BLOCKS - 512,
        "the second run fetched {} chunks; the first stored 512 before its stop",
        second.len()
    );
    assert_eq!(second, rest);
    assert_eq!(n.restore(&format!("vm1@s-{}", up.id)), up.data.concat());
    n.ok(&["verify"]);
}

/// A manifest file that an interrupted update left under the id being fetched is used only if
/// it is the manifest this update stores: another one under that id (left by an update from
/// another upstream that listed the same id, say) stops the update, and nothing is committed
/// over it.
#[test]
fn a_manifest_left_under_the_same_id_is_used_only_if_it_is_the_same() {
    let up = synthetic_upstream(64, None, false);
    let (n, cfg) = downstream(&up.fake.url());
    let cfg = cfg.to_str().unwrap().to_string();
    let dir = n.state.join("repo/manifests/vm1");
    std::fs::create_dir_all(&dir).unwrap();
    let left = dir.join(up.id.to_string());
    let mut other = up.manifest.clone();
    other.name = "other".parse().unwrap();
    std::fs::write(&left, other.encode().unwrap()).unwrap();
    let r = n.run(&["mirror", "run", "vm1", "--config", &cfg]);
    assert_eq!(r.code, 4, "committed over another manifest: {}", r.stderr);
    assert_eq!(
        std::fs::read(&left).unwrap(),
        other.encode().unwrap(),
        "the manifest left there was changed"
    );
    let vols = n.run(&["volume", "list", "--json"]).json();
    assert!(
        !vols.to_string().contains("\"vm1\""),
        "a replica was made: {vols}"
    );
    // What this update stores, left by an interrupted run of it: used.
    std::fs::write(&left, up.manifest.encode().unwrap()).unwrap();
    let r = n.run(&["mirror", "run", "vm1", "--config", &cfg]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(n.restore(&format!("vm1@s-{}", up.id)), up.data.concat());
    n.ok(&["verify"]);
}

/// A stop that lands inside a request (here the lock set before the transfer, which the
/// upstream answers a second later) ends the update at the next safe point, before any
/// manifest is asked for, keeping nothing half done; and a request the upstream never answers
/// is cut 30 s after the stop, where it is, as a kill would cut it.
#[test]
fn a_stopped_update_ends_at_the_next_safe_point_or_is_cut() {
    let up = synthetic_upstream(64, None, true);
    let (n, cfg) = downstream(&up.fake.url());
    let cfg = cfg.to_str().unwrap().to_string();
    let puts = |want: usize| {
        let t0 = Instant::now();
        while up
            .fake
            .requests()
            .iter()
            .filter(|q| q.starts_with("PUT"))
            .count()
            < want
        {
            assert!(t0.elapsed() < Duration::from_secs(60), "no lock set sent");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Never answered: cut.
    let child = n.spawn(&["mirror", "run", "vm1", "--config", &cfg]);
    puts(1);
    let (code, stderr) = stop(child, Duration::from_secs(90));
    assert_eq!(code, Some(7), "{stderr}");
    assert!(
        stderr.contains("reached no safe point within 30s"),
        "{stderr}"
    );
    // Answered a second after the stop: the update ends before its manifests.
    let child = n.spawn(&["mirror", "run", "vm1", "--config", &cfg]);
    puts(2);
    let released = up.released.clone();
    let answer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        released.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let (code, stderr) = stop(child, Duration::from_secs(60));
    answer.join().unwrap();
    assert_eq!(code, Some(7), "{stderr}");
    assert!(
        stderr.contains("interrupted") && stderr.contains("after receiving 0 snapshot(s)"),
        "{stderr}"
    );
    assert!(
        !up.fake.requests().iter().any(|q| q.contains("/manifest")),
        "{:?}",
        up.fake.requests()
    );
    let vols = n.run(&["volume", "list", "--json"]).json();
    assert!(!vols.to_string().contains("\"vm1\""), "{vols}");
    n.ok(&["verify"]);
    // And the next run completes.
    let r = n.run(&["mirror", "run", "vm1", "--config", &cfg]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(n.restore(&format!("vm1@s-{}", up.id)), up.data.concat());
}
