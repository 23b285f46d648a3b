//! A real `redis-server` on a free loopback port for one test (Debian package `redis-server`,
//! installed by scripts/test.sh), killed when dropped. No persistence: a restart loses its data.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        Self::start_on(port)
    }

    /// Starts (or restarts) on a given port and waits until it answers PING.
    pub fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // DEBUG SLEEP: a Redis that stops answering for a while (tests/cluster.rs).
            .args(["--enable-debug-command", "local"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (Debian package redis-server; scripts/test.sh installs it)");
        let redis = Redis { child: Some(child), port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = redis.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return redis;
                }
            }
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer PING within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis URL")
    }

    pub fn connection(&self) -> redis::Connection {
        self.client().get_connection().expect("connect to the test redis-server")
    }

    /// Kills the server at once (SIGKILL): its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
