//! Keys move between CloudCode / the PowerSync Node demo and uplink in both directions.

use std::process::Command;

use jwt_simple::prelude::*;
use uplink_api::config::ApiConfig;
use uplink_api::keys::{SigningKey, VerifyingKey};
use uplink_api::tokens::TokenService;
use uplink_common::config::Env;
use uplink_tests::process::binary;

fn env_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn service_for(vars: &[(String, String)]) -> TokenService {
    let mut env = Env::from_map(vars.iter().cloned());
    env.set("POWERSYNC_URL", "https://ps.example");
    env.set("UPLINK_DEV", "1");
    let cfg = ApiConfig::from_env(&env).expect("keys load");
    TokenService::new(
        cfg.keys.clone(),
        cfg.powersync_url.clone(),
        None,
        cfg.token_lifetime,
        cfg.clock_leeway,
    )
}

#[test]
fn keys_from_keys_generate_round_trip() {
    // Arrange: run the real command.
    let output = Command::new(binary("uplink-api"))
        .args(["keys", "generate"])
        .output()
        .expect("uplink-api runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let vars = env_lines(&String::from_utf8(output.stdout).expect("utf-8"));
    let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["POWERSYNC_PRIVATE_KEY", "POWERSYNC_PUBLIC_KEY"]);

    // Act: load both into the api's configuration and mint a token.
    let service = service_for(&vars);
    let (token, _) = service.issue("user-1").expect("signs");

    // Assert: the printed public key (alone) verifies it, and its kid has the CloudCode form.
    let public = VerifyingKey::parse(&vars[1].1).expect("public key loads");
    assert!(public.kid.starts_with("powersync-"), "{}", public.kid);
    let jwk = public.jwk();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let key =
        RS256PublicKey::from_components(&b64.decode(jwk.n).expect("n"), &b64.decode(jwk.e).expect("e")).expect("key");
    let claims = key.verify_token::<NoCustomClaims>(&token, None).expect("verifies");
    assert_eq!(claims.subject.as_deref(), Some("user-1"));
    assert_eq!(
        Token::decode_metadata(&token).expect("jwt").key_id(),
        Some(public.kid.as_str())
    );
}

#[test]
fn a_key_in_the_node_demo_format_loads_and_signs() {
    // Made by tests/fixtures/make-node-demo-key.js with Node's crypto, as the demo does.
    let vars = env_lines(include_str!("../fixtures/node-demo-key.env"));
    let service = service_for(&vars);
    let (token, _) = service.issue("user-2").expect("signs");
    let public = VerifyingKey::parse(&vars[1].1).expect("public key loads");
    assert_eq!(public.kid, service.keys().signing.kid, "the JWK's own kid is kept");
    assert!(service.verify(&token).is_ok());
}

#[test]
fn a_key_generated_by_uplink_loads_in_node() {
    // The other direction: Node's crypto (what the demo and CloudCode run on) imports uplink's
    // JWK and verifies a token uplink signed.
    let key = SigningKey::generate(2048).expect("key");
    let service = service_for(&[("POWERSYNC_PRIVATE_KEY".into(), key.private_env_value())]);
    let (token, _) = service.issue("user-3").expect("signs");
    let script = r#"
        const crypto = require('crypto');
        const [privB64, pubB64, token] = process.argv.slice(1);
        const priv = JSON.parse(Buffer.from(privB64, 'base64').toString());
        const pub = JSON.parse(Buffer.from(pubB64, 'base64').toString());
        crypto.createPrivateKey({ key: priv, format: 'jwk' });
        const publicKey = crypto.createPublicKey({ key: pub, format: 'jwk' });
        const [h, p, s] = token.split('.');
        const ok = crypto.verify('RSA-SHA256', Buffer.from(`${h}.${p}`), publicKey, Buffer.from(s, 'base64url'));
        const header = JSON.parse(Buffer.from(h, 'base64url').toString());
        if (!ok || header.kid !== pub.kid || priv.kid !== pub.kid || pub.alg !== 'RS256') process.exit(1);
        console.log('ok');
    "#;
    let output = match Command::new("node")
        .args(["-e", script, &key.private_env_value(), &key.public_env_value(), &token])
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("node is required for this test: {e}"),
    };
    assert!(
        output.status.success(),
        "node refused the key or token: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
