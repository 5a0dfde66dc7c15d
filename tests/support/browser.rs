//! Headless Chromium over WebDriver for tests/browser.rs: finds Debian's
//! `chromium` and `chromedriver`, starts chromedriver on a free port, opens
//! sessions with a chosen `Accept-Language`, and waits on page state with a
//! deadline (WebDriver waits, no sleeps).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// How long a page may take to reach the state a step waits for.
pub const PAGE_DEADLINE: Duration = Duration::from_secs(15);

pub struct Browser {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).flat_map(|dir| names.iter().map(move |name| dir.join(name))).find(|p| p.is_file())
}

impl Browser {
    /// `CHROME_BIN` / `CHROMEDRIVER`, else `chromium` and `chromedriver` on PATH.
    pub fn find() -> Result<Self, String> {
        let from_env = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_file());
        let chromium = from_env("CHROME_BIN")
            .or_else(|| on_path(&["chromium", "chromium-browser", "google-chrome"]))
            .ok_or("no chromium on PATH (nor CHROME_BIN)")?;
        let chromedriver = from_env("CHROMEDRIVER")
            .or_else(|| on_path(&["chromedriver"]))
            .ok_or("no chromedriver on PATH (nor CHROMEDRIVER)")?;
        Ok(Self { chromium, chromedriver })
    }

    /// Starts chromedriver on a port it picks itself and reads which from its output.
    pub async fn start_driver(&self) -> Driver {
        let mut child = Command::new(&self.chromedriver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let stdout = child.stdout.take().expect("chromedriver stdout");
        let port = tokio::time::timeout(PAGE_DEADLINE, async {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await.expect("chromedriver output") {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').trim().parse::<u16>().expect("chromedriver port");
                }
            }
            panic!("chromedriver ended before it said its port");
        })
        .await
        .expect("chromedriver starts in time");
        Driver { child, url: format!("http://127.0.0.1:{port}"), chromium: self.chromium.clone() }
    }
}

pub struct Driver {
    child: Child,
    url: String,
    chromium: PathBuf,
}

impl Driver {
    /// A new headless browser whose requests say `Accept-Language: <language>`.
    pub async fn session(&self, language: &str) -> Client {
        self.open(language, true).await
    }

    /// The same with JavaScript turned off: the pages' no-script fallback.
    pub async fn session_without_javascript(&self, language: &str) -> Client {
        self.open(language, false).await
    }

    async fn open(&self, language: &str, javascript: bool) -> Client {
        let mut prefs = serde_json::json!({ "intl.accept_languages": language });
        if !javascript {
            prefs["profile.managed_default_content_settings.javascript"] = 2.into();
        }
        let options = serde_json::json!({
            "binary": self.chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=820,760", format!("--lang={language}")],
            "prefs": prefs,
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), "chrome".into());
        capabilities.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector).capabilities(capabilities).connect(&self.url).await.expect("a WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver and the browsers it started share its process group:
        // end them all, also when a step panicked with sessions open.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        }
    }
}

/// Waits until `css` matches an element, or fails with the page's text.
pub async fn wait_for(client: &Client, css: &str) -> Element {
    match client.wait().at_most(PAGE_DEADLINE).for_element(Locator::Css(css)).await {
        Ok(element) => element,
        Err(error) => {
            let url = client.current_url().await.map(|u| u.to_string()).unwrap_or_default();
            let text = match client.find(Locator::Css("body")).await {
                Ok(body) => body.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            panic!("{css} did not appear within {PAGE_DEADLINE:?} ({error}); page {url}:\n{text}");
        }
    }
}

/// Waits until `css` matches and returns its visible text.
pub async fn text_of(client: &Client, css: &str) -> String {
    wait_for(client, css).await.text().await.expect("element text")
}

/// Saves a screenshot as `<dir>/<name>.png` when `PUSHMATCH_SCREENSHOTS=<dir>` is set.
pub async fn screenshot(client: &Client, name: &str) {
    let Some(dir) = std::env::var_os("PUSHMATCH_SCREENSHOTS") else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}
