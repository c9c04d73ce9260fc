//! The api refuses unsafe configurations at start-up, naming the variable to fix, and never
//! shows a secret in `Debug` output.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use uplink_api::config::{ApiConfig, TokenAuth};
use uplink_common::config::Env;

use crate::support::*;

#[test]
fn the_binary_exits_non_zero_naming_the_variable_when_no_token_auth_is_configured_outside_development() {
    // Arrange: a key and a URL, but no UPLINK_TOKEN_AUTH and no UPLINK_DEV.
    let mut child = Command::new(env!("CARGO_BIN_EXE_uplink-api"))
        .env_clear()
        .env("POWERSYNC_URL", POWERSYNC_URL)
        .env("POWERSYNC_PRIVATE_KEY", rsa(0).private_env_value())
        .env("UPLINK_API_ADDR", "127.0.0.1:0")
        .env(
            "AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts the binary");

    // Act: it must exit by itself; one that keeps running is a failure.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Assert
    let status = status.expect("the api should refuse to start, but it kept running");
    assert!(!status.success());
    assert!(stderr.contains("UPLINK_TOKEN_AUTH"), "{stderr}");
    assert!(
        stderr.contains("UPLINK_DEV"),
        "the message names the way out for developers: {stderr}"
    );
}

#[test]
fn unsafe_or_incomplete_token_auth_configurations_are_refused_naming_the_variable() {
    // Arrange
    let jwt = || {
        with(
            base_env(),
            &[
                ("UPLINK_TOKEN_AUTH", "jwt"),
                ("UPLINK_TOKEN_JWT_ISSUER", IDP_ISSUER),
                ("UPLINK_TOKEN_JWT_AUDIENCE", IDP_AUDIENCE),
            ],
        )
    };
    let jwks = "https://idp.example/.well-known/jwks.json";
    let cases: Vec<(&str, Env, &str)> = vec![
        (
            "open mode outside development",
            with(base_env(), &[("UPLINK_TOKEN_AUTH", "open")]),
            "UPLINK_TOKEN_AUTH",
        ),
        (
            "an unknown mode",
            with(base_env(), &[("UPLINK_TOKEN_AUTH", "trust-me")]),
            "UPLINK_TOKEN_AUTH",
        ),
        (
            "a short shared secret",
            with(base_env(), &[("UPLINK_TOKEN_SHARED_SECRET", "short")]),
            "UPLINK_TOKEN_SHARED_SECRET",
        ),
        ("jwt without keys", jwt(), "UPLINK_TOKEN_JWKS_URL"),
        (
            "jwt with both a JWKS and a secret",
            with(
                jwt(),
                &[
                    ("UPLINK_TOKEN_JWKS_URL", jwks),
                    ("UPLINK_TOKEN_HS256_SECRET", IDP_HS256_SECRET),
                ],
            ),
            "UPLINK_TOKEN_HS256_SECRET",
        ),
        (
            "jwt with a short HS256 secret",
            with(jwt(), &[("UPLINK_TOKEN_HS256_SECRET", "short")]),
            "UPLINK_TOKEN_HS256_SECRET",
        ),
        (
            "jwt without an issuer",
            with(
                jwt(),
                &[("UPLINK_TOKEN_JWKS_URL", jwks), ("UPLINK_TOKEN_JWT_ISSUER", "")],
            ),
            "UPLINK_TOKEN_JWT_ISSUER",
        ),
        (
            "jwt without an audience",
            with(
                jwt(),
                &[("UPLINK_TOKEN_JWKS_URL", jwks), ("UPLINK_TOKEN_JWT_AUDIENCE", " , ")],
            ),
            "UPLINK_TOKEN_JWT_AUDIENCE",
        ),
        (
            "a plain-http JWKS on another host",
            with(jwt(), &[("UPLINK_TOKEN_JWKS_URL", "http://idp.example/jwks.json")]),
            "UPLINK_TOKEN_JWKS_URL",
        ),
        (
            "a JWKS URL that is not a URL",
            with(jwt(), &[("UPLINK_TOKEN_JWKS_URL", "idp.example")]),
            "UPLINK_TOKEN_JWKS_URL",
        ),
        (
            "upload auth off outside development",
            with(base_env(), &[("UPLINK_UPLOAD_AUTH", "none")]),
            "UPLINK_UPLOAD_AUTH",
        ),
        (
            "an allowlist naming a system collection",
            with(base_env(), &[("UPLINK_ALLOWED_COLLECTIONS", "todos,system.users")]),
            "UPLINK_ALLOWED_COLLECTIONS",
        ),
        (
            "an allowlist naming an invalid collection",
            with(base_env(), &[("UPLINK_ALLOWED_COLLECTIONS", "a$b")]),
            "UPLINK_ALLOWED_COLLECTIONS",
        ),
    ];

    // Act
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(name, env, var)| match ApiConfig::from_env(env) {
            Ok(_) => Some(format!("{name}: accepted, expected an error naming {var}")),
            Err(e) if e.var != *var => Some(format!("{name}: error names {}, expected {var} ({e})", e.var)),
            Err(_) => None,
        })
        .collect();

    // Assert
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn plain_http_jwks_is_allowed_for_loopback_hosts_and_in_development_mode() {
    // Arrange
    let jwt = |url: &str, dev: &str| {
        with(
            base_env(),
            &[
                ("UPLINK_TOKEN_AUTH", "jwt"),
                ("UPLINK_TOKEN_JWKS_URL", url),
                ("UPLINK_TOKEN_JWT_ISSUER", IDP_ISSUER),
                ("UPLINK_TOKEN_JWT_AUDIENCE", IDP_AUDIENCE),
                ("UPLINK_DEV", dev),
            ],
        )
    };

    // Act
    let loopback_v4 = ApiConfig::from_env(&jwt("http://127.0.0.1:8081/jwks", "0"));
    let loopback_v6 = ApiConfig::from_env(&jwt("http://[::1]:8081/jwks", "0"));
    let localhost = ApiConfig::from_env(&jwt("http://localhost/jwks", "0"));
    let dev_remote = ApiConfig::from_env(&jwt("http://keycloak:8080/jwks", "1"));
    let prod_remote = ApiConfig::from_env(&jwt("http://keycloak:8080/jwks", "0"));

    // Assert
    assert!(loopback_v4.is_ok() && loopback_v6.is_ok() && localhost.is_ok() && dev_remote.is_ok());
    assert_eq!(prod_remote.expect_err("refused").var, "UPLINK_TOKEN_JWKS_URL");
}

#[test]
fn jwt_mode_defaults_the_user_claim_to_sub_and_splits_audiences() {
    // Arrange
    let env = with(
        base_env(),
        &[
            ("UPLINK_TOKEN_AUTH", "jwt"),
            ("UPLINK_TOKEN_HS256_SECRET", IDP_HS256_SECRET),
            ("UPLINK_TOKEN_JWT_ISSUER", IDP_ISSUER),
            ("UPLINK_TOKEN_JWT_AUDIENCE", "web, mobile"),
        ],
    );

    // Act
    let config = ApiConfig::from_env(&env).expect("valid");

    // Assert
    let TokenAuth::Jwt(jwt) = &config.token_auth else {
        panic!("expected jwt mode, got {:?}", config.token_auth)
    };
    assert_eq!(jwt.user_claim, "sub");
    assert_eq!(jwt.audiences, vec!["web".to_owned(), "mobile".to_owned()]);
}

#[test]
fn secrets_never_appear_in_the_configurations_debug_output() {
    // Arrange: every secret the api reads, each in a configuration that holds it.
    let amqp_password = "amqp-password-4f9c1d";
    let private_key_env = rsa(0).private_env_value();
    let private_jwk: serde_json::Value =
        serde_json::from_slice(&STANDARD.decode(&private_key_env).expect("base64")).expect("jwk");
    let private_exponent = private_jwk["d"].as_str().expect("d").to_owned();
    let shared = with(
        base_env(),
        &[("AMQP_URL", &format!("amqp://uplink:{amqp_password}@127.0.0.1:5672/%2f"))],
    );
    let hs256 = hs256_env();
    let configs = [
        ApiConfig::from_env(&shared).expect("valid"),
        ApiConfig::from_env(&hs256).expect("valid"),
    ];

    // Act
    let shown: Vec<String> = configs
        .iter()
        .flat_map(|c| [format!("{c:?}"), format!("{c:#?}")])
        .collect();

    // Assert
    for text in &shown {
        for (what, secret) in [
            ("the shared secret", SHARED_SECRET),
            ("the HS256 secret", IDP_HS256_SECRET),
            ("the AMQP password", amqp_password),
            ("the private key's exponent", &private_exponent[..24]),
            ("the private key variable", &private_key_env[..24]),
        ] {
            assert!(!text.contains(secret), "{what} appears in {text}");
        }
    }
    // The output is still useful: it shows the mode and the key id.
    assert!(
        shown[2].contains("Hs256") && shown[0].contains(&rsa(0).kid),
        "{}",
        shown[2]
    );
}
