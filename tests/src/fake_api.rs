//! A stand-in for the Kubernetes API server, for tests: no kube-apiserver
//! (nor kind or k3s) can run on these machines, so this HTTP/1.1 server
//! speaks the part of the API protocol Ferry's watches use: `list` (with
//! `metadata.resourceVersion`), `watch` from a resource version (newline-
//! delimited JSON events, `ERROR` with a `410 Gone` Status to force a
//! relist), and 404 for an API that is not installed.
//!
//! Objects are JSON as `kubectl get -o json` prints them. Every change gets
//! a new resource version and goes to open watches; a watch that starts
//! from an older version first replays what it missed. [`FakeApi::down`]
//! makes the server drop every connection (open watches end, new requests
//! fail) until [`FakeApi::up`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The collections the server knows: URL path → (list kind, object kind).
const RESOURCES: &[(&str, &str)] = &[
    ("/api/v1/services", "Service"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice"),
    ("/api/v1/pods", "Pod"),
    ("/api/v1/nodes", "Node"),
    ("/api/v1/namespaces", "Namespace"),
    (
        "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes",
        "TCPRoute",
    ),
];

fn path_of(kind: &str) -> &'static str {
    RESOURCES
        .iter()
        .find(|(_, k)| *k == kind)
        .map(|(p, _)| *p)
        .unwrap_or_else(|| panic!("fake API does not serve {kind}"))
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// kind → key → object.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Every change: (resource version, kind, event type, object).
    log: Vec<(u64, &'static str, &'static str, Value)>,
    watches: Vec<(&'static str, mpsc::UnboundedSender<Bytes>)>,
    down: bool,
    missing: Vec<&'static str>,
    /// Kinds whose list requests wait until released.
    held: Vec<&'static str>,
    /// Requests seen: (kind, "list"|"watch", query).
    requests: Vec<(&'static str, &'static str, String)>,
}

/// The fake API server; clones share it.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    held: Arc<tokio::sync::Notify>,
    pub addr: SocketAddr,
}

fn key(o: &Value) -> String {
    let m = &o["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or("")),
        None => m["name"].as_str().unwrap_or("").to_owned(),
    }
}

fn kind_of(o: &Value) -> &'static str {
    let k = o["kind"].as_str().unwrap_or("");
    RESOURCES
        .iter()
        .find(|(_, kk)| *kk == k)
        .map(|(_, kk)| *kk)
        .unwrap_or_else(|| panic!("fake API does not serve kind {k:?}"))
}

struct WatchBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

type Reply = Response<http_body_util::Either<http_body_util::Full<Bytes>, WatchBody>>;

fn full(status: StatusCode, v: Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Either::Left(http_body_util::Full::new(
            Bytes::from(v.to_string()),
        )))
        .expect("valid response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApi {
    /// Serves on `listener` (already bound, possibly inside a network
    /// namespace) from the current tokio runtime.
    pub fn serve(listener: std::net::TcpListener) -> std::io::Result<FakeApi> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let api = FakeApi {
            inner: Arc::new(Mutex::new(Inner::default())),
            held: Arc::new(tokio::sync::Notify::new()),
            addr,
        };
        let a = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                if a.lock().down {
                    drop(stream);
                    continue;
                }
                let a = a.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let a = a.clone();
                        // While down, a request fails the connection: hyper
                        // closes it without an answer, as an unreachable server would.
                        async move {
                            a.handle(req)
                                .await
                                .ok_or_else(|| std::io::Error::other("API down"))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(api)
    }

    /// Binds 127.0.0.1 on a free port and serves.
    pub async fn start() -> std::io::Result<FakeApi> {
        FakeApi::serve(std::net::TcpListener::bind("127.0.0.1:0")?)
    }

    /// Serves on `addr` inside the network namespace `netns`, from a
    /// runtime of its own (the caller keeps it alive as long as the server).
    pub fn serve_in_netns(
        netns: &str,
        addr: &str,
    ) -> anyhow::Result<(tokio::runtime::Runtime, FakeApi)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = crate::bind_in_netns(netns, addr)?;
        let api = {
            let _g = rt.enter();
            FakeApi::serve(listener)?
        };
        Ok((rt, api))
    }

    /// `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server to `<dir>/kubeconfig`
    /// (for the agent's `KUBECONFIG`) and returns its path.
    pub fn write_kubeconfig(&self, dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: none\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: none\ncurrent-context: fake\n",
                self.url()
            ),
        )?;
        Ok(path)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces an object (or each item of a `List`).
    pub fn apply(&self, o: Value) {
        if o["kind"] == "List" {
            for item in o["items"].as_array().cloned().unwrap_or_default() {
                self.apply(item);
            }
            return;
        }
        self.change(o, true);
    }

    /// Deletes an object (kind and metadata are enough).
    pub fn delete(&self, o: Value) {
        self.change(o, false);
    }

    fn change(&self, mut o: Value, add: bool) {
        let kind = kind_of(&o);
        let k = key(&o);
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        let map = s.objects.entry(kind).or_default();
        let ty = if !add {
            match map.remove(&k) {
                Some(_) => "DELETED",
                None => return,
            }
        } else if map.insert(k, o.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.log.push((rv, kind, ty, o.clone()));
        let line = Bytes::from(format!("{}\n", json!({"type": ty, "object": o})));
        s.watches
            .retain(|(wk, tx)| *wk != kind || tx.send(line.clone()).is_ok());
    }

    /// Ends every open watch with `410 Gone` (as when the server's history
    /// was compacted) and forgets the history, so resuming is impossible
    /// and clients must list again.
    pub fn expire_watches(&self) {
        let mut s = self.lock();
        s.log.clear();
        let gone =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        for (_, tx) in s.watches.drain(..) {
            let _ = tx.send(Bytes::from(format!("{gone}\n")));
        }
    }

    /// Drops every connection and refuses to serve until [`FakeApi::up`].
    pub fn down(&self) {
        let mut s = self.lock();
        s.down = true;
        s.watches.clear();
    }

    pub fn up(&self) {
        self.lock().down = false;
    }

    /// Answer 404 for this kind (its CRD is not installed).
    pub fn set_missing(&self, kind: &'static str, missing: bool) {
        let mut s = self.lock();
        s.missing.retain(|k| *k != kind);
        if missing {
            s.missing.push(kind);
        }
    }

    /// Makes list requests for `kind` wait until [`FakeApi::release`].
    pub fn hold(&self, kind: &'static str) {
        self.lock().held.push(kind);
    }

    pub fn release(&self) {
        self.lock().held.clear();
        self.held.notify_waiters();
    }

    /// How many requests of `what` (`list` or `watch`) were made for `kind`.
    pub fn requests(&self, kind: &str, what: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|(k, w, _)| *k == kind && *w == what)
            .count()
    }

    /// The query strings of every request for `kind`.
    pub fn queries(&self, kind: &str) -> Vec<String> {
        self.lock()
            .requests
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, _, q)| q.clone())
            .collect()
    }

    async fn handle(&self, req: Request<Incoming>) -> Option<Reply> {
        if self.lock().down {
            return None;
        }
        Some(self.reply(req).await)
    }

    async fn reply(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let Some((_, kind)) = RESOURCES.iter().find(|(p, _)| *p == path) else {
            return full(StatusCode::NOT_FOUND, status(404, "NotFound", "not found"));
        };
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let watch = params.get("watch").is_some_and(|v| v == "true" || v == "1");
        {
            let mut s = self.lock();
            s.requests
                .push((kind, if watch { "watch" } else { "list" }, query.clone()));
            if s.missing.contains(kind) {
                return full(
                    StatusCode::NOT_FOUND,
                    status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                );
            }
        }
        if !watch {
            loop {
                let wait = self.held.notified();
                if !self.lock().held.contains(kind) {
                    break;
                }
                wait.await;
            }
        }
        let mut s = self.lock();
        if !watch {
            let items: Vec<Value> = s
                .objects
                .get(kind)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            return full(
                StatusCode::OK,
                json!({"kind": format!("{kind}List"), "apiVersion": "v1",
                       "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            );
        }
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        let oldest = s.log.first().map(|(rv, ..)| *rv).unwrap_or(s.rv + 1);
        if from < s.rv && from + 1 < oldest {
            // History gone: the client must list again.
            let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let _ = tx.send(Bytes::from(format!("{gone}\n")));
        } else {
            for (rv, k, ty, o) in &s.log {
                if *rv > from && k == kind {
                    let _ = tx.send(Bytes::from(format!(
                        "{}\n",
                        json!({"type": ty, "object": o})
                    )));
                }
            }
            s.watches.push((kind, tx));
        }
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(http_body_util::Either::Right(WatchBody(rx)))
            .expect("valid response")
    }
}

/// The object kind a fixture's path serves (for tests that assert requests).
pub fn collection_path(kind: &str) -> &'static str {
    path_of(kind)
}
