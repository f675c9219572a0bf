//! A real S3-compatible server for the tests: moto's server mode, installed into a virtual
//! environment by `./test.sh` (`target/moto-venv`, from `tests/s3/requirements.txt`), started
//! on 127.0.0.1 on a free port and stopped when dropped. It enforces credentials (an IAM user
//! made at start), conditional writes (`If-None-Match: *`), multipart uploads and pagination.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cascade::free_port;

/// The virtual environment `./test.sh` creates.
fn venv() -> PathBuf {
    std::env::var_os("HOLDFAST_MOTO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/moto-venv"))
}

pub struct S3Server {
    pub port: u16,
    pub access_key: String,
    pub secret_key: String,
    child: Option<Child>,
}

impl S3Server {
    /// Starts moto and makes an IAM user whose keys the tests use (requests with other keys
    /// are refused).
    pub fn start() -> S3Server {
        let bin = venv().join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: ./test.sh installs it (python3 -m venv target/moto-venv && \
             target/moto-venv/bin/pip install -r tests/s3/requirements.txt)",
            bin.display()
        );
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // The first three requests (making the user, its key and its policy) need no
            // credentials; every later one does.
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let mut s = S3Server {
            port,
            access_key: String::new(),
            secret_key: String::new(),
            child: Some(child),
        };
        s.wait_ready();
        let out = s.python(
            r#"
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="holdfast")
k = iam.create_access_key(UserName="holdfast")["AccessKey"]
iam.put_user_policy(UserName="holdfast", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
print(k["AccessKeyId"], k["SecretAccessKey"])
"#,
            &[],
        );
        let mut it = out.split_whitespace();
        s.access_key = it.next().expect("access key").to_string();
        s.secret_key = it.next().expect("secret key").to_string();
        s
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment holdfast needs to reach the server with the good keys.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("HOLDFAST_TARGET_TIMEOUT".into(), "3s".into()),
        ]
    }

    /// Runs a Python snippet in the venv (boto3 available) with argv[1] = the endpoint,
    /// argv[2], argv[3] = the keys, then `args`; returns stdout.
    pub fn python(&self, script: &str, args: &[&str]) -> String {
        let out = Command::new(venv().join("bin/python"))
            .arg("-c")
            .arg(script)
            .arg(self.endpoint())
            .arg(&self.access_key)
            .arg(&self.secret_key)
            .args(args)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn create_bucket(&self, name: &str) {
        self.python(
            r#"
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
s3.create_bucket(Bucket=sys.argv[4])
"#,
            &[name],
        );
    }

    /// Every key in a bucket with its size, sorted.
    pub fn objects(&self, bucket: &str) -> Vec<String> {
        let out = self.python(
            r#"
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[4]):
    for o in page.get("Contents", []):
        print(o["Key"], o["Size"])
"#,
            &[bucket],
        );
        let mut v: Vec<String> = out.lines().map(str::to_string).collect();
        v.sort();
        v
    }

    /// Writes an object.
    pub fn put(&self, bucket: &str, key: &str, body: &str) {
        self.python(
            r#"
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
s3.put_object(Bucket=sys.argv[4], Key=sys.argv[5], Body=sys.argv[6].encode())
"#,
            &[bucket, key, body],
        );
    }

    /// Starts a watcher that freezes the server (SIGSTOP) as soon as a key under `prefix`
    /// appears in `bucket` (polled every 10 ms by one Python process, so it catches a transfer
    /// mid-way). Wait on the returned child: it exits 0 once it froze the server, 1 if nothing
    /// appeared within 60 s.
    pub fn freeze_when_key_appears(&self, bucket: &str, prefix: &str) -> std::process::Child {
        let pid = self.child.as_ref().expect("running").id().to_string();
        Command::new(venv().join("bin/python"))
            .arg("-c")
            .arg(
                r#"
import boto3, os, signal, sys, time
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
bucket, prefix, pid = sys.argv[4], sys.argv[5], int(sys.argv[6])
t0 = time.time()
while time.time() - t0 < 60:
    if s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0:
        os.kill(pid, signal.SIGSTOP)
        sys.exit(0)
    time.sleep(0.01)
sys.exit(1)
"#,
            )
            .arg(self.endpoint())
            .arg(&self.access_key)
            .arg(&self.secret_key)
            .args([bucket, prefix, &pid])
            .spawn()
            .expect("start the watcher")
    }

    /// Freezes the server (SIGSTOP): connections hang as on a dead server, state survives.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Thaws it (SIGCONT).
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(st.success());
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
