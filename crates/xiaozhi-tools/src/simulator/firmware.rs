//! Which firmware a simulated device is, and what that firmware sends and accepts.
//!
//! * [`Firmware::V2_4`] (the default): 78/xiaozhi-esp32 2.4 (`main/protocols/
//!   mqtt_protocol.cc`, `protocol.cc`, `text_glyph_payload.cc`, read at 2.4.2). Its hello
//!   carries `features.glyph_push` and the `text_font` it renders with, and it is strict
//!   about what it accepts: a server hello it does not like is ignored (the device gives
//!   up after 10 s), a `glyph_push` payload that breaks a rule is thrown away whole.
//!   [`check_server_hello`] and [`check_glyph_push`] are those rules, so a simulated
//!   device can say exactly which server message a real one would have refused.
//! * [`Firmware::V1`]: the 1.x hello (`features` `mcp` and `aec` only), which stock devices
//!   in the field still send; the gateway must keep serving them unchanged.
//!
//! Both apply the downlink datagram rules in [`super::audio`] (type, exact length, a
//! strictly increasing sequence, at most [`MAX_DOWNLINK_PAYLOAD`] bytes).

use base64::Engine;
use serde_json::{Value, json};

/// The largest downlink Opus payload the firmware can receive: its UDP socket reads into
/// a 1,500-byte buffer, so a longer datagram arrives truncated and fails the length check.
pub const MAX_DOWNLINK_PAYLOAD: usize = 1500 - xiaozhi_gateway::protocol::datagram::HEADER_LEN;

/// Most glyphs in one `glyph_push` payload.
pub const MAX_GLYPHS: usize = 64;

/// Most decoded bitmap bytes in one `glyph_push` payload.
pub const MAX_GLYPH_BYTES: usize = 64 * 1024;

/// The firmware generation a simulated device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Firmware {
    /// 2.4: hello with `glyph_push` and `text_font`; strict about server messages.
    #[default]
    #[value(name = "2.4")]
    V2_4,
    /// 1.x: hello with `mcp` and `aec` only.
    #[value(name = "1")]
    V1,
}

/// The font a 2.4 device renders text with, as its hello announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextFont {
    pub bundle: String,
    pub charset: String,
    pub size: u32,
    pub bpp: u32,
}

impl Default for TextFont {
    /// What the standard assets of a 20-pixel, 4-bpp board announce.
    fn default() -> Self {
        TextFont {
            bundle: "noto-v1".into(),
            charset: "common".into(),
            size: 20,
            bpp: 4,
        }
    }
}

impl Firmware {
    /// The hello this firmware sends to open a conversation (stock: no transport
    /// extensions).
    pub fn hello(self) -> Value {
        let mut hello = json!({
            "type": "hello",
            "version": 3,
            "transport": "udp",
            "features": { "mcp": true, "aec": false },
            "audio_params": { "format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60 },
        });
        if self == Firmware::V2_4 {
            let font = TextFont::default();
            hello["features"]["glyph_push"] = json!(true);
            hello["text_font"] = json!({
                "bundle": font.bundle,
                "charset": font.charset,
                "size": font.size,
                "bpp": font.bpp,
            });
        }
        hello
    }

    /// The font it renders with (2.4 only).
    pub fn text_font(self) -> Option<TextFont> {
        (self == Firmware::V2_4).then(TextFont::default)
    }

    /// Whether it refuses server messages that break its rules.
    pub fn is_strict(self) -> bool {
        self == Firmware::V2_4
    }

    pub fn label(self) -> &'static str {
        match self {
            Firmware::V2_4 => "2.4",
            Firmware::V1 => "1",
        }
    }
}

/// What the 2.4 firmware checks in a server message before acting on it (`OnMessage`,
/// `ParseServerHello`, `OnIncomingJson`, `TextGlyphPayload::Parse`). `Ok` carries the
/// number of glyphs a `glyph_push` delivered; `Err` says why the device refuses the
/// message (a hello it ignores, a glyph payload it drops).
pub fn check_server_message(payload: &[u8], font: &TextFont) -> Result<usize, String> {
    let message: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON ({e})"))?;
    let Some(kind) = message.get("type").and_then(Value::as_str) else {
        return Err("no string \"type\"".into());
    };
    match (kind, message.get("state").and_then(Value::as_str)) {
        ("hello", _) if message.get("transport") != Some(&json!("quic")) => {
            check_server_hello(&message).map(|()| 0)
        }
        ("tts", Some("sentence_start")) | ("stt", _) if message["text"].is_string() => {
            check_glyph_push(&message, font)
        }
        ("notify" | "alert" | "custom" | "system", _) => check_push_message(&message).map(|()| 0),
        _ => Ok(0),
    }
}

/// What the firmware checks in the messages a server pushes to an idle device
/// (`Application::OnIncomingJson`): `notify` needs an `audio_url` string starting with
/// `http://` or `https://`, and `subtitles`, when present, must be an array (anything
/// else drops the whole message; entries without a numeric `start_ms` and a string
/// `text` are skipped); `alert` needs `status`, `message` and `emotion` strings; `custom`
/// shows its `payload` object; `system` acts on the string `command` `reboot`.
pub fn check_push_message(message: &Value) -> Result<(), String> {
    let string = |k: &str| message.get(k).and_then(Value::as_str);
    match string("type").unwrap_or_default() {
        "notify" => {
            let url = string("audio_url").ok_or("notify: no string audio_url")?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("notify: audio_url {url:?} is not http(s)"));
            }
            match message.get("subtitles") {
                None | Some(Value::Array(_)) => Ok(()),
                Some(_) => Err("notify: subtitles is not an array (message dropped)".into()),
            }
        }
        "alert" => match (string("status"), string("message"), string("emotion")) {
            (Some(_), Some(_), Some(_)) => Ok(()),
            _ => Err("alert: status, message and emotion must all be strings".into()),
        },
        "custom" if message.get("payload").is_some_and(Value::is_object) => Ok(()),
        "custom" => Err("custom: payload is not an object".into()),
        "system" if string("command") == Some("reboot") => Ok(()),
        "system" => Err("system: the only command is reboot".into()),
        _ => Ok(()),
    }
}

/// The 2.4 firmware's server-hello rules: `transport` the string `udp`; a `udp` object
/// with a string `server`, a numeric `port` from 1 to 65535, and `key` and `nonce` that
/// are hex strings of exactly 16 bytes (32 characters).
pub fn check_server_hello(hello: &Value) -> Result<(), String> {
    if hello.get("transport").and_then(Value::as_str) != Some("udp") {
        return Err("server hello: transport is not \"udp\"".into());
    }
    let Some(udp) = hello.get("udp").filter(|u| u.is_object()) else {
        return Err("server hello: no udp object".into());
    };
    if !udp["server"].is_string() {
        return Err("server hello: udp.server is not a string".into());
    }
    // cJSON's valueint truncates a fractional port.
    let port = udp["port"].as_f64().map(|p| p.trunc());
    if !port.is_some_and(|p| (1.0..=65535.0).contains(&p)) {
        return Err(format!(
            "server hello: udp.port {} is not in 1..65535",
            udp["port"]
        ));
    }
    for field in ["key", "nonce"] {
        let ok = udp[field]
            .as_str()
            .and_then(|s| hex::decode(s).ok())
            .is_some_and(|b| b.len() == 16);
        if !ok {
            return Err(format!(
                "server hello: udp.{field} is not 32 hex characters: {}",
                udp[field]
            ));
        }
    }
    Ok(())
}

/// The 2.4 firmware's `glyph_push` rules for a `tts`/`sentence_start` or `stt` message:
/// none, or a payload of version 1 for exactly the device's font, at most 64 glyphs of
/// valid metrics whose bitmaps (standard base64, padded) decode to exactly
/// `ceil(w * h * bpp / 8)` bytes, at most 64 KiB in all. Returns the number of glyphs.
pub fn check_glyph_push(message: &Value, font: &TextFont) -> Result<usize, String> {
    let Some(push) = message.get("glyph_push").filter(|p| p.is_object()) else {
        return Ok(0);
    };
    let reject = |why: &str| Err(format!("glyph_push rejected: {why}"));
    let int = |v: &Value| v.as_f64().map(c_int);
    if int(&push["v"]) != Some(1) {
        return reject("v is not 1");
    }
    if push["bundle"].as_str() != Some(font.bundle.as_str()) {
        return reject("bundle is not the device's");
    }
    if push["size"].as_f64() != Some(f64::from(font.size))
        || push["bpp"].as_f64() != Some(f64::from(font.bpp))
    {
        return reject("size or bpp is not the device's");
    }
    let Some(glyphs) = push["glyphs"].as_array() else {
        return reject("glyphs is not an array");
    };
    if glyphs.len() > MAX_GLYPHS {
        return reject("more than 64 glyphs");
    }
    let mut total = 0usize;
    for glyph in glyphs {
        let num = |k: &str| glyph.get(k).and_then(Value::as_f64);
        let (Some(codepoint), Some(adv_w), Some(box_w), Some(box_h), Some(ofs_x), Some(ofs_y)) = (
            num("codepoint"),
            num("adv_w"),
            num("box_w"),
            num("box_h"),
            num("ofs_x"),
            num("ofs_y"),
        ) else {
            return reject("a glyph field is missing or not a number");
        };
        let (box_w, box_h) = (c_int(box_w), c_int(box_h));
        let in_i16 = |v: f64| (i64::from(i16::MIN)..=i64::from(i16::MAX)).contains(&c_int(v));
        if codepoint <= 0.0
            || codepoint > f64::from(0x10FFFF)
            || adv_w < 0.0
            || adv_w > f64::from(u32::MAX)
            || !(0..=64).contains(&box_w)
            || !(0..=64).contains(&box_h)
            || !in_i16(ofs_x)
            || !in_i16(ofs_y)
        {
            return reject("a glyph's metrics are out of range");
        }
        let Some(bitmap) = glyph.get("bitmap").and_then(Value::as_str) else {
            return reject("a bitmap is not a string");
        };
        let expected = ((box_w * box_h) as usize * font.bpp as usize).div_ceil(8);
        total += expected;
        if total > MAX_GLYPH_BYTES {
            return reject("more than 64 KiB of bitmaps");
        }
        if bitmap.len() > expected.div_ceil(3) * 4 + 4 {
            return reject("a base64 bitmap is too long");
        }
        if expected == 0 {
            if !bitmap.is_empty() {
                return reject("an empty glyph has a bitmap");
            }
            continue;
        }
        // mbedtls: the standard alphabet with padding; line breaks are skipped.
        let compact: String = bitmap
            .chars()
            .filter(|c| *c != '\n' && *c != '\r')
            .collect();
        match base64::engine::general_purpose::STANDARD.decode(compact) {
            Ok(bytes) if bytes.len() == expected => {}
            _ => return reject("a bitmap does not decode to its size"),
        }
    }
    Ok(glyphs.len())
}

/// What cJSON's `valueint` makes of a number: truncated toward zero, saturated at the C
/// `int` range.
fn c_int(v: f64) -> i64 {
    v.trunc().clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i64
}

/// A `glyph_push` payload for `font` with `count` glyphs of `box_w` x `box_h`, the most
/// the firmware takes when `count * ceil(box_w * box_h * bpp / 8)` is 64 KiB (for tests
/// and the load tool).
pub fn glyph_push(font: &TextFont, count: usize, box_w: u32, box_h: u32) -> Value {
    let bytes = ((box_w * box_h * font.bpp) as usize).div_ceil(8);
    let glyphs: Vec<Value> = (0..count)
        .map(|i| {
            let bitmap: Vec<u8> = (0..bytes).map(|b| (b * 7 + i * 13) as u8).collect();
            json!({
                "codepoint": 0x20000 + i,
                "adv_w": box_w * 16,
                "box_w": box_w,
                "box_h": box_h,
                "ofs_x": 0,
                "ofs_y": -2,
                "bitmap": base64::engine::general_purpose::STANDARD.encode(bitmap),
            })
        })
        .collect();
    json!({
        "v": 1,
        "bundle": font.bundle,
        "size": font.size,
        "bpp": font.bpp,
        "glyphs": glyphs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Value {
        json!({
            "type": "hello", "transport": "udp", "session_id": "s",
            "udp": {"server": "192.0.2.1", "port": 8884, "encryption": "aes-128-ctr",
                    "key": "00112233445566778899aabbccddeeff", "nonce": "0100000012345678000000000000000A"},
            "audio_params": {"sample_rate": 24000, "frame_duration": 60},
        })
    }

    #[test]
    fn the_2_4_hello_announces_its_font() {
        let h = Firmware::V2_4.hello();
        assert_eq!(h["features"]["glyph_push"], true);
        assert_eq!(h["text_font"]["bundle"], "noto-v1");
        assert_eq!(h["version"], 3);
        let old = Firmware::V1.hello();
        assert!(old["features"].get("glyph_push").is_none());
        assert!(old.get("text_font").is_none());
    }

    #[test]
    fn server_hellos_are_checked_as_2_4_checks_them() {
        assert_eq!(check_server_hello(&hello()), Ok(()));
        let bad = |f: &dyn Fn(&mut Value)| {
            let mut h = hello();
            f(&mut h);
            check_server_hello(&h)
        };
        assert!(bad(&|h| h["transport"] = json!("websocket")).is_err());
        assert!(bad(&|h| h["udp"] = json!("x")).is_err());
        assert!(bad(&|h| h["udp"]["server"] = json!(1)).is_err());
        assert!(bad(&|h| h["udp"]["port"] = json!(0)).is_err());
        assert!(bad(&|h| h["udp"]["port"] = json!(65536)).is_err());
        assert!(bad(&|h| h["udp"]["port"] = json!("8884")).is_err());
        assert!(bad(&|h| h["udp"]["key"] = json!("00112233")).is_err());
        assert!(bad(&|h| h["udp"]["nonce"] = json!("zz".repeat(16))).is_err());
        assert!(bad(&|h| h["udp"]["key"] = json!("0".repeat(33))).is_err());
        // What it does not look at.
        assert!(bad(&|h| h["udp"]["encryption"] = json!("rot13")).is_ok());
        assert!(bad(&|h| h["udp"]["port"] = json!(65535.7)).is_ok());
        assert!(
            bad(&|h| {
                h.as_object_mut().unwrap().remove("session_id");
            })
            .is_ok()
        );
    }

    #[test]
    fn the_largest_glyph_payload_is_accepted_and_one_byte_more_is_not() {
        let font = TextFont::default();
        // 64 glyphs of 64 x 32 at 4 bpp: 1,024 bytes each, 64 KiB in all.
        let push = glyph_push(&font, 64, 64, 32);
        let message =
            json!({"type": "tts", "state": "sentence_start", "text": "𠀀", "glyph_push": push});
        assert_eq!(check_glyph_push(&message, &font), Ok(64));
        assert!(message.to_string().len() > 87_000);
        let mut over = message.clone();
        over["glyph_push"]["glyphs"][0]["box_w"] = json!(64);
        over["glyph_push"]["glyphs"][0]["box_h"] = json!(33);
        assert!(check_glyph_push(&over, &font).is_err(), "64 KiB + 32 bytes");
        let mut many = message.clone();
        many["glyph_push"]["glyphs"]
            .as_array_mut()
            .unwrap()
            .push(json!({}));
        assert!(check_glyph_push(&many, &font).is_err(), "65 glyphs");
    }

    #[test]
    fn each_glyph_rule_rejects() {
        let font = TextFont::default();
        let base = json!({"type": "stt", "text": "x", "glyph_push": glyph_push(&font, 2, 10, 10)});
        assert_eq!(check_glyph_push(&base, &font), Ok(2));
        let bad = |path: &[&str], v: Value| {
            let mut m = base.clone();
            let mut at = &mut m["glyph_push"];
            for p in &path[..path.len() - 1] {
                at = match p.parse::<usize>() {
                    Ok(i) => &mut at[i],
                    Err(_) => &mut at[*p],
                };
            }
            at[path[path.len() - 1]] = v;
            check_glyph_push(&m, &font)
        };
        assert!(bad(&["v"], json!(2)).is_err());
        assert!(bad(&["v"], json!(1.9)).is_ok(), "cJSON truncates");
        assert!(bad(&["bundle"], json!("other")).is_err());
        assert!(bad(&["size"], json!(16)).is_err());
        assert!(bad(&["bpp"], json!(1)).is_err());
        assert!(bad(&["glyphs", "0", "codepoint"], json!(0)).is_err());
        assert!(bad(&["glyphs", "0", "codepoint"], json!(0x110000)).is_err());
        assert!(bad(&["glyphs", "0", "adv_w"], json!(-1)).is_err());
        assert!(bad(&["glyphs", "0", "box_w"], json!(65)).is_err());
        assert!(bad(&["glyphs", "0", "ofs_y"], json!(40000)).is_err());
        assert!(bad(&["glyphs", "0", "bitmap"], json!("AAAA")).is_err());
        assert!(bad(&["glyphs", "0", "bitmap"], json!(7)).is_err());
        // No glyph_push, or not an object: the message is fine.
        assert_eq!(
            check_glyph_push(&json!({"type": "stt", "text": "x"}), &font),
            Ok(0)
        );
        assert_eq!(
            check_glyph_push(
                &json!({"type": "stt", "text": "x", "glyph_push": []}),
                &font
            ),
            Ok(0)
        );
    }

    #[test]
    fn pushed_messages_are_checked_as_the_firmware_reads_them() {
        for good in [
            json!({"type": "notify", "audio_url": "https://x/a.ogg"}),
            json!({"type": "notify", "audio_url": "http://x/a.ogg", "subtitles": [{"start_ms": 0, "text": "a"}]}),
            json!({"type": "alert", "status": "s", "message": "m", "emotion": "happy"}),
            json!({"type": "custom", "payload": {"a": 1}}),
            json!({"type": "system", "command": "reboot"}),
        ] {
            assert_eq!(check_push_message(&good), Ok(()), "{good}");
        }
        for bad in [
            json!({"type": "notify"}),
            json!({"type": "notify", "audio_url": "ftp://x/a.ogg"}),
            json!({"type": "notify", "audio_url": "https://x/a.ogg", "subtitles": "a"}),
            json!({"type": "alert", "status": "s", "message": "m"}),
            json!({"type": "custom", "payload": "text"}),
            json!({"type": "system", "command": "shutdown"}),
        ] {
            assert!(check_push_message(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_the_firmware_cannot_read_are_refused() {
        let font = TextFont::default();
        assert!(check_server_message(b"nope", &font).is_err());
        assert!(check_server_message(br#"{"type":3}"#, &font).is_err());
        assert_eq!(
            check_server_message(br#"{"type":"llm","emotion":"happy"}"#, &font),
            Ok(0)
        );
        assert!(check_server_message(br#"{"type":"hello","transport":"udp"}"#, &font).is_err());
    }
}
