//! The simulated network: every peer request of the process goes through [`Net`], which hands
//! it to the upstream's own router (the real peer server, in this process) or loses it, answers
//! nothing, delivers it late (after newer requests: reordered), delivers it twice, cuts a pair
//! of nodes apart, or stops the sender dead (a crash, with the request unanswered).
//!
//! What happens to a message is decided by a hash of the seed, the step, the message and how
//! many times the same message was sent in the step, never by the order in which concurrent
//! requests happen to arrive: a history replays exactly from its seed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use holdfast::id::NodeId;
use tower::ServiceExt;

/// Per mille chances of each fault, per message, while faults are on.
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    pub lost: u64,
    pub answer_lost: u64,
    pub late: u64,
    pub twice: u64,
    pub sender_crash: u64,
    /// At each crash point of the code (`holdfast::peer::client::crash_point`).
    pub crash_point: u64,
}

impl Rates {
    pub const NONE: Rates = Rates {
        lost: 0,
        answer_lost: 0,
        late: 0,
        twice: 0,
        sender_crash: 0,
        crash_point: 0,
    };
    pub const DEFAULT: Rates = Rates {
        lost: 30,
        answer_lost: 30,
        late: 20,
        twice: 20,
        sender_crash: 10,
        crash_point: 40,
    };
}

/// A request delivered at a later step (its sender heard nothing, or already had its answer).
struct Late {
    at_step: u64,
    from: NodeId,
    to: NodeId,
    request: http::Request<Bytes>,
}

#[derive(Default)]
pub struct NetState {
    pub seed: u64,
    pub step: u64,
    pub rates: Option<Rates>,
    routers: HashMap<NodeId, axum::Router>,
    /// Nodes that answer nothing (away).
    pub down: HashSet<NodeId>,
    /// Pairs that cannot reach each other (kept in name order).
    cut: HashSet<(NodeId, NodeId)>,
    /// How often each message was seen in this step.
    seen: HashMap<blake3::Hash, u64>,
    late: Vec<Late>,
    /// Nodes that crashed in the middle of a request: the simulation restarts them.
    pub crashed: HashSet<NodeId>,
    pub messages: u64,
    /// Answers that asked the sender to slow down (a per-peer rate limit).
    pub slowed: u64,
    pub faults: u64,
    pub events: Vec<String>,
}

fn pair(a: &NodeId, b: &NodeId) -> (NodeId, NodeId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

enum Fate {
    Deliver,
    Lost,
    AnswerLost,
    Late(u64),
    Twice(u64),
    SenderCrash,
}

impl NetState {
    pub fn set_router(&mut self, node: &NodeId, router: Option<axum::Router>) {
        match router {
            Some(r) => self.routers.insert(node.clone(), r),
            None => self.routers.remove(node),
        };
    }

    pub fn cut(&mut self, a: &NodeId, b: &NodeId, cut: bool) {
        if cut {
            self.cut.insert(pair(a, b));
        } else {
            self.cut.remove(&pair(a, b));
        }
    }

    pub fn is_cut(&self, a: &NodeId, b: &NodeId) -> bool {
        self.cut.contains(&pair(a, b))
    }

    pub fn heal(&mut self) {
        self.cut.clear();
        self.down.clear();
        self.rates = None;
    }

    pub fn next_step(&mut self, step: u64) {
        self.step = step;
        self.seen.clear();
    }

    /// A random number for the `n`th time `key` (a message, a crash point of a node) comes
    /// up in this step.
    fn roll(&mut self, key: blake3::Hash) -> u64 {
        let n = self.seen.entry(key).or_default();
        *n += 1;
        let mut h = blake3::Hasher::new();
        h.update(key.as_bytes());
        h.update(&n.to_le_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
    }

    fn fate(&mut self, from: &NodeId, to: &NodeId, req: &http::Request<Bytes>) -> Fate {
        let Some(r) = self.rates else {
            return Fate::Deliver;
        };
        let mut h = blake3::Hasher::new();
        h.update(&self.seed.to_le_bytes());
        h.update(&self.step.to_le_bytes());
        for part in [from.as_str(), to.as_str(), req.method().as_str()] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        h.update(req.uri().to_string().as_bytes());
        h.update(&[0]);
        h.update(&stable_body(req));
        let roll = self.roll(h.finalize());
        let (p, later) = (roll % 1000, 1 + (roll >> 32) % 4);
        let mut edge = 0;
        let mut pick = |rate: u64| {
            edge += rate;
            p < edge
        };
        if pick(r.lost) {
            Fate::Lost
        } else if pick(r.answer_lost) {
            Fate::AnswerLost
        } else if pick(r.late) {
            Fate::Late(later)
        } else if pick(r.twice) {
            Fate::Twice(later)
        } else if pick(r.sender_crash) {
            Fate::SenderCrash
        } else {
            Fate::Deliver
        }
    }

    /// The requests due by now, to be delivered (their answers go nowhere).
    fn due(&mut self) -> Vec<Late> {
        let step = self.step;
        let (due, keep) = std::mem::take(&mut self.late)
            .into_iter()
            .partition(|l| l.at_step <= step);
        self.late = keep;
        due
    }
}

/// A request's body as the fate of the request depends on it: a lock set without its
/// generation (which counts on from whatever this process sent before, in other histories too).
fn stable_body(req: &http::Request<Bytes>) -> Vec<u8> {
    if req.uri().path().ends_with("/locks")
        && let Ok(serde_json::Value::Object(mut set)) = serde_json::from_slice(req.body())
    {
        set.remove("generation");
        return serde_json::to_vec(&set).unwrap_or_default();
    }
    req.body().to_vec()
}

/// The transport every [`holdfast::peer::client::PeerClient`] of the process uses.
#[derive(Clone, Default)]
pub struct Net(pub Arc<Mutex<NetState>>);

fn copy(req: &http::Request<Bytes>) -> http::Request<Bytes> {
    let mut out = http::Request::new(req.body().clone());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    out
}

async fn deliver(
    router: axum::Router,
    req: http::Request<Bytes>,
) -> Result<http::Response<Bytes>, String> {
    let resp = router
        .oneshot(req.map(axum::body::Body::from))
        .await
        .unwrap_or_else(|e| match e {});
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| format!("reading an answer: {e}"))?;
    Ok(http::Response::from_parts(parts, body))
}

impl Net {
    pub fn state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.0.lock().expect("not poisoned")
    }

    /// Delivers the requests whose time has come; their answers are dropped.
    pub async fn deliver_late(&self) {
        let due = self.state().due();
        for l in due {
            let router = {
                let mut s = self.state();
                if s.down.contains(&l.to) || s.is_cut(&l.from, &l.to) {
                    continue;
                }
                s.messages += 1;
                s.events.push(format!(
                    "late {} {} {} -> {}",
                    l.request.method(),
                    l.request.uri().path(),
                    l.from,
                    l.to
                ));
                s.routers.get(&l.to).cloned()
            };
            if let Some(r) = router {
                let _ = deliver(r, l.request).await;
            }
        }
    }
}

impl holdfast::peer::client::Transport for Net {
    fn crash_at(&self, node: &NodeId, point: &str) -> bool {
        let mut s = self.state();
        let Some(r) = s.rates else { return false };
        let mut h = blake3::Hasher::new();
        h.update(&s.seed.to_le_bytes());
        h.update(&s.step.to_le_bytes());
        h.update(node.as_str().as_bytes());
        h.update(&[0]);
        h.update(point.as_bytes());
        let roll = s.roll(h.finalize());
        if roll % 1000 >= r.crash_point {
            return false;
        }
        s.faults += 1;
        s.crashed.insert(node.clone());
        s.events.push(format!("fault: {node} crashed at {point}"));
        true
    }

    fn send(
        &self,
        from: &NodeId,
        to: &NodeId,
        request: http::Request<Bytes>,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, String>> {
        let st = self.0.clone();
        let (from, to) = (from.clone(), to.clone());
        Box::pin(async move {
            let (router, fate) = {
                let mut s = st.lock().expect("not poisoned");
                s.messages += 1;
                if s.down.contains(&to) || s.down.contains(&from) || s.is_cut(&from, &to) {
                    return Err(format!("{to} is unreachable (simulated outage)"));
                }
                let fate = s.fate(&from, &to, &request);
                let what = match &fate {
                    Fate::Deliver => None,
                    Fate::Lost => Some("lost".to_string()),
                    Fate::AnswerLost => Some("answer lost".to_string()),
                    Fate::Late(k) => Some(format!("late by {k} steps")),
                    Fate::Twice(k) => Some(format!("delivered again {k} steps later")),
                    Fate::SenderCrash => Some(format!("{from} crashed while sending")),
                };
                if let Some(w) = what {
                    s.faults += 1;
                    let line = format!(
                        "fault: {} {} {from} -> {to}: {w}",
                        request.method(),
                        request.uri().path()
                    );
                    s.events.push(line);
                }
                let step = s.step;
                match &fate {
                    Fate::Late(k) | Fate::Twice(k) => s.late.push(Late {
                        at_step: step + k,
                        from: from.clone(),
                        to: to.clone(),
                        request: copy(&request),
                    }),
                    Fate::SenderCrash => {
                        s.crashed.insert(from.clone());
                    }
                    _ => {}
                }
                (s.routers.get(&to).cloned(), fate)
            };
            let Some(router) = router else {
                return Err(format!("{to} is not running"));
            };
            match fate {
                Fate::Lost => Err("the request was lost (simulated)".into()),
                Fate::Late(_) => Err("no answer in time (simulated; it arrives later)".into()),
                // Killed while waiting: this request is never answered, and nothing after it runs.
                Fate::SenderCrash => futures::future::pending().await,
                Fate::AnswerLost => {
                    deliver(router, request).await?;
                    Err("the connection broke before the answer (simulated)".into())
                }
                Fate::Deliver | Fate::Twice(_) => {
                    let answer = deliver(router, request).await?;
                    // 429 (the request rate) or 503 saying so (the rate of lock sets).
                    if answer.status() == http::StatusCode::TOO_MANY_REQUESTS
                        || (answer.status() == http::StatusCode::SERVICE_UNAVAILABLE
                            && answer.body().windows(9).any(|w| w == b"slow down"))
                    {
                        st.lock().expect("not poisoned").slowed += 1;
                    }
                    Ok(answer)
                }
            }
        })
    }
}
