//! The configuration: a TOML file and `PUSHMATCH_*` environment variables, through
//! `Config::load_text` (what `Config::load` does after reading the file).
//!
//! Input: the first byte's low bit says whether a file is given; the rest is the
//! file's text, then after a NUL byte the environment, one `KEY=VALUE` a line.
//! Checked: no panic; a loaded configuration passes its own validation again, every
//! module's settings can be made from it, and written back as TOML it loads again
//! to the same configuration; a refusal names its key or origin.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pushmatch::config::Config;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (file, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(String, String)> =
        env.lines().filter_map(|line| line.split_once('=')).map(|(key, value)| (key.to_owned(), value.to_owned())).collect();
    let file = (flags & 1 == 1).then_some(("fuzz.toml", file));
    let loaded = match Config::load_text(file, env) {
        Ok(loaded) => loaded,
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains(": "), "a refusal names where: {message}");
            return;
        }
    };
    let config = loaded.config;
    config.validate().expect("a loaded configuration is valid");
    let _ = config.broker_settings();
    let _ = config.dispatcher_settings();
    let _ = config.redis_settings();
    let _ = config.tls_files();
    let _ = config.tenant_keys();
    let _ = config.domain_tenants();
    let _ = config.listen_addr().expect("a validated listen address");

    // Written back, it is the same configuration. (A digest file was read into the
    // tenant's digests already: reading it again would add them twice.)
    if config.tenants.iter().any(|tenant| tenant.api_key_sha256_file.is_some()) {
        return;
    }
    let written = toml::to_string(&config).expect("a configuration serializes");
    let again = Config::load_text(Some(("written.toml", &written)), Vec::new())
        .unwrap_or_else(|error| panic!("{error}\n{written}"))
        .config;
    assert_eq!(toml::to_string(&again).expect("serializes"), written);
});
