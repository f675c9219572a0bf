//! A fake upstream for hostile-peer tests: HTTP/2 without TLS on 127.0.0.1 (a downstream
//! reaches a loopback upstream in plaintext when its config says `http://`), answering every
//! request with what the test's handler returns, so that it can speak the peer protocol badly
//! on purpose. It runs on a thread of its own until dropped, and keeps a log of requests.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// What the test answers: (method, path and query, body) → response.
pub type Handler = Arc<dyn Fn(&Method, &str, &[u8]) -> Response + Send + Sync>;

pub struct FakeUpstream {
    pub port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn start(handler: Handler) -> FakeUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app =
                    axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
                        let h = handler.clone();
                        let log = log.clone();
                        async move {
                            let path = uri
                                .path_and_query()
                                .map_or_else(|| uri.path().to_string(), |p| p.to_string());
                            log.lock().unwrap().push(format!("{method} {path}"));
                            h(&method, &path, &body)
                        }
                    });
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        FakeUpstream {
            port,
            requests,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far, as "METHOD PATH?QUERY".
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A JSON answer.
pub fn json(status: u16, body: serde_json::Value) -> Response {
    (
        StatusCode::from_u16(status).expect("status"),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// An answer of `total` bytes of `fill`, streamed in 1 MiB pieces without a length.
pub fn endless(total: usize, fill: u8) -> Response {
    let piece = Bytes::from(vec![fill; 1 << 20]);
    let n = total.div_ceil(1 << 20);
    let stream = futures::stream::iter((0..n).map(move |_| Ok::<_, std::io::Error>(piece.clone())));
    Response::new(Body::from_stream(stream))
}
