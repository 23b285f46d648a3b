//! A real nginx (Debian package `nginx`, installed by scripts/test.sh) running deploy/nginx.conf
//! in front of test nodes: the file's upstream and listen addresses are replaced, nothing else.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: PathBuf,
}

impl Nginx {
    /// Starts nginx with deploy/nginx.conf, its two upstream servers replaced by `nodes`.
    pub fn start(nodes: [SocketAddr; 2]) -> Nginx {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let conf = std::fs::read_to_string(root.join("deploy/nginx.conf")).expect("read deploy/nginx.conf");
        let addr = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        for needle in ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8080"] {
            assert!(conf.contains(needle), "deploy/nginx.conf no longer has {needle}");
        }
        let conf = conf
            .replace("127.0.0.1:8081", &nodes[0].to_string())
            .replace("127.0.0.1:8082", &nodes[1].to_string())
            .replace("127.0.0.1:8080", &addr.to_string());
        let dir = std::env::temp_dir().join(format!("ringcast-nginx-{}-{}", std::process::id(), addr.port()));
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx prefix directory");
        std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (Debian package nginx; scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {addr} within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, addr, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; a SIGKILLed master would leave them running.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}
