//! A real browser for the web page's tests: Debian's headless Chromium, driven through
//! chromedriver (WebDriver) with fantoccini. Blocking calls, each bounded in time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::cascade::free_port;

/// Headless Chromium under chromedriver, and the session with it.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// The programs it needs, or why it cannot run here.
pub fn available() -> Result<(), String> {
    for p in ["chromedriver", "chromium"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {p}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "{p} is not installed (Debian packages chromium and chromium-driver; ./test.sh \
                 installs them)"
            ));
        }
    }
    Ok(())
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session that trusts
    /// the tests' self-signed certificate (`--ignore-certificate-errors`: the daemons' TLS is
    /// what it is in production; the browser just cannot be given the test CA otherwise).
    pub fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "args": [
                    "--headless=new",
                    // Tests run as root in containers, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--ignore-certificate-errors",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let r = rt.block_on(
                ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&url),
            );
            match r {
                Ok(c) => break c,
                Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                    panic!("could not open a Chromium session through chromedriver: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        Browser {
            rt,
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("session open")
    }

    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.c().goto(url))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Types `text` into the element `css` names.
    pub fn type_into(&self, css: &str, text: &str) {
        self.rt.block_on(async {
            let e = self.c().find(Locator::Css(css)).await.expect(css);
            e.send_keys(text).await.expect("type");
        });
    }

    pub fn click(&self, css: &str) {
        self.rt.block_on(async {
            let e = self.c().find(Locator::Css(css)).await.expect(css);
            e.click().await.expect("click");
        });
    }

    /// Runs `script` (a function body: `return ...`) in the page.
    pub fn eval(&self, script: &str) -> Value {
        self.rt
            .block_on(self.c().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` (an async function body: `return await ...`) in the page and waits for
    /// its result.
    pub fn eval_async(&self, script: &str) -> Value {
        let wrapped = format!(
            "const done = arguments[arguments.length - 1]; \
             (async () => {{ {script} }})().then(done, e => done({{error: String(e)}}));"
        );
        self.rt
            .block_on(self.c().execute_async(&wrapped, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until `script` returns true (or panics after 30 s, with what it last returned
    /// and the page's text).
    pub fn wait_for(&self, what: &str, script: &str) {
        let t0 = Instant::now();
        loop {
            let v = self.eval(script);
            if v == Value::Bool(true) {
                return;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let text = self.eval("return document.body.innerText;");
                panic!("timed out waiting for {what} (last: {v})\npage text:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the window into `dir/name.png`.
    pub fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        let png = self.rt.block_on(self.c().screenshot()).expect("screenshot");
        std::fs::create_dir_all(dir).expect("screenshot folder");
        let p = dir.join(format!("{name}.png"));
        std::fs::write(&p, png).expect("write screenshot");
        p
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
