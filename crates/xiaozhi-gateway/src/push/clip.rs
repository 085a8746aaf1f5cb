//! Clips for `notify` pushes, in the one format the firmware's notify player takes: mono
//! Ogg Opus (78/xiaozhi-esp32: it reads the OpusHead, then plays 5-120 ms packets; no
//! MP3, no WAV, no stereo).
//!
//! An uploaded Ogg Opus that is already mono is kept byte for byte; a stereo one is
//! refused (we would have to decode and re-encode it, and the operator is better told).
//! WAV and MP3 are decoded (symphonia), mixed down to mono, resampled to 16 kHz (a
//! windowed-sinc low-pass, then linear interpolation) and encoded with libopus in 60 ms
//! packets (the firmware's own frame length) into an Ogg Opus stream (the `ogg` crate
//! pages it). Pure functions: bytes in, bytes out; the caller runs them off the runtime.

use std::io::Cursor;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// The rate clips are encoded at (speech and prompts; the firmware decodes at its own rate).
pub const ENCODE_RATE: u32 = 16_000;
/// Samples per encoded packet: 60 ms at [`ENCODE_RATE`].
const FRAME: usize = (ENCODE_RATE as usize) * 60 / 1000;
/// Opus granule positions count 48 kHz samples whatever the encoded rate.
const GRANULE_PER_SAMPLE: u64 = 48_000 / ENCODE_RATE as u64;
/// The bitrate of encoded clips.
const BITRATE: i32 = 32_000;

/// What an upload is, as its bytes show (the `Content-Type` is only a hint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipFormat {
    OggOpus,
    Wav,
    Mp3,
}

impl ClipFormat {
    pub fn name(self) -> &'static str {
        match self {
            ClipFormat::OggOpus => "ogg_opus",
            ClipFormat::Wav => "wav",
            ClipFormat::Mp3 => "mp3",
        }
    }

    /// Recognises the format from the first bytes.
    pub fn sniff(bytes: &[u8]) -> Option<ClipFormat> {
        if bytes.starts_with(b"OggS") {
            Some(ClipFormat::OggOpus)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
            Some(ClipFormat::Wav)
        } else if bytes.starts_with(b"ID3")
            || (bytes.len() >= 2 && bytes[0] == 0xFF && bytes[1] & 0xE0 == 0xE0)
        {
            Some(ClipFormat::Mp3)
        } else {
            None
        }
    }
}

/// A clip ready to serve.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Mono Ogg Opus.
    pub ogg: Vec<u8>,
    pub duration_ms: u64,
    /// What was uploaded.
    pub from: ClipFormat,
}

/// Why an upload cannot be played by the firmware.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClipError {
    #[error("not audio the gateway reads: send Ogg Opus (mono), WAV or MP3")]
    UnknownFormat,
    #[error("not an Ogg Opus stream: {0}")]
    NotOpus(String),
    #[error(
        "the clip has {0} channels; the firmware's notify player plays mono Ogg Opus only (send WAV or MP3 and it is converted)"
    )]
    NotMono(u8),
    #[error("cannot decode the {0}: {1}")]
    Decode(&'static str, String),
    #[error("the clip is {0} ms long; at most {1} ms (push.max_clip_secs)")]
    TooLong(u64, u64),
    #[error("the clip holds no audio")]
    Empty,
    #[error("opus encoder: {0}")]
    Encode(String),
}

/// Turns an upload into a clip the firmware plays, refusing what it would not.
pub fn prepare(bytes: &[u8], max_ms: u64) -> Result<Clip, ClipError> {
    let format = ClipFormat::sniff(bytes).ok_or(ClipError::UnknownFormat)?;
    let clip = match format {
        ClipFormat::OggOpus => Clip {
            duration_ms: check_ogg_opus(bytes)?,
            ogg: bytes.to_vec(),
            from: format,
        },
        ClipFormat::Wav | ClipFormat::Mp3 => {
            let (samples, rate) = decode_to_mono(bytes, format)?;
            let pcm = resample(&samples, rate, ENCODE_RATE);
            if pcm.is_empty() {
                return Err(ClipError::Empty);
            }
            let duration_ms = pcm.len() as u64 * 1000 / u64::from(ENCODE_RATE);
            if duration_ms > max_ms {
                return Err(ClipError::TooLong(duration_ms, max_ms));
            }
            Clip {
                ogg: encode_ogg_opus(&pcm)?,
                duration_ms,
                from: format,
            }
        }
    };
    if clip.duration_ms > max_ms {
        return Err(ClipError::TooLong(clip.duration_ms, max_ms));
    }
    Ok(clip)
}

/// Checks an Ogg stream as the firmware reads it (an OpusHead of one channel first);
/// returns its duration from the last granule position, less the pre-skip.
pub fn check_ogg_opus(bytes: &[u8]) -> Result<u64, ClipError> {
    let mut reader = ogg::PacketReader::new(Cursor::new(bytes));
    let bad = |e: ogg::OggReadError| ClipError::NotOpus(e.to_string());
    let head = reader
        .read_packet()
        .map_err(bad)?
        .ok_or_else(|| ClipError::NotOpus("empty stream".into()))?;
    let data = &head.data;
    if data.len() < 19 || &data[..8] != b"OpusHead" {
        return Err(ClipError::NotOpus(
            "the first packet is not an OpusHead".into(),
        ));
    }
    let channels = data[9];
    if channels != 1 {
        return Err(ClipError::NotMono(channels));
    }
    let pre_skip = u64::from(u16::from_le_bytes([data[10], data[11]]));
    let mut last_granule = 0u64;
    let mut packets = 0u64;
    while let Some(packet) = reader.read_packet().map_err(bad)? {
        packets += 1;
        last_granule = last_granule.max(packet.absgp_page());
    }
    if packets < 2 {
        return Err(ClipError::Empty);
    }
    Ok(last_granule.saturating_sub(pre_skip) / 48)
}

/// Decodes WAV or MP3 into mono samples and their rate.
fn decode_to_mono(bytes: &[u8], format: ClipFormat) -> Result<(Vec<f32>, u32), ClipError> {
    let what = format.name();
    let fail = |e: SymphoniaError| ClipError::Decode(what, e.to_string());
    let source = MediaSourceStream::new(Box::new(Cursor::new(bytes.to_vec())), Default::default());
    let mut hint = Hint::new();
    hint.with_extension(if format == ClipFormat::Mp3 {
        "mp3"
    } else {
        "wav"
    });
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(fail)?;
    let mut reader = probed.format;
    let track = reader
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| ClipError::Decode(what, "no audio track".into()))?;
    let track_id = track.id;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(fail)?;
    let mut mono = Vec::new();
    let mut rate = track.codec_params.sample_rate.unwrap_or(0);
    loop {
        let packet = match reader.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(e) => return Err(fail(e)),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged frame is skipped, as players do.
            Err(SymphoniaError::DecodeError(_)) => continue,
            Err(e) => return Err(fail(e)),
        };
        let spec = *decoded.spec();
        rate = spec.rate;
        let channels = spec.channels.count().max(1);
        let mut buffer = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buffer.copy_interleaved_ref(decoded);
        for frame in buffer.samples().chunks(channels) {
            mono.push(frame.iter().sum::<f32>() / channels as f32);
        }
    }
    if rate == 0 || mono.is_empty() {
        return Err(ClipError::Empty);
    }
    Ok((mono, rate))
}

/// Resamples mono audio to `to` Hz: a windowed-sinc low-pass below the new Nyquist
/// frequency when going down, then linear interpolation.
pub fn resample(input: &[f32], from: u32, to: u32) -> Vec<i16> {
    if input.is_empty() || from == 0 {
        return Vec::new();
    }
    let filtered;
    let source: &[f32] = if from > to {
        filtered = low_pass(input, 0.45 * to as f32 / from as f32);
        &filtered
    } else {
        input
    };
    let step = f64::from(from) / f64::from(to);
    let out_len = ((source.len() as f64) / step).floor() as usize;
    (0..out_len)
        .map(|i| {
            let pos = i as f64 * step;
            let j = pos as usize;
            let frac = (pos - j as f64) as f32;
            let a = source[j];
            let b = *source.get(j + 1).unwrap_or(&a);
            let v = a + (b - a) * frac;
            (v.clamp(-1.0, 1.0) * 32767.0) as i16
        })
        .collect()
}

/// A 63-tap Hann-windowed sinc low-pass with cut-off `cutoff` (a fraction of the sample
/// rate).
fn low_pass(input: &[f32], cutoff: f32) -> Vec<f32> {
    const TAPS: usize = 63;
    let mid = (TAPS / 2) as f32;
    let mut taps = [0f32; TAPS];
    for (n, tap) in taps.iter_mut().enumerate() {
        let x = n as f32 - mid;
        let sinc = if x == 0.0 {
            2.0 * cutoff
        } else {
            (2.0 * std::f32::consts::PI * cutoff * x).sin() / (std::f32::consts::PI * x)
        };
        let window = 0.5 - 0.5 * (2.0 * std::f32::consts::PI * n as f32 / (TAPS - 1) as f32).cos();
        *tap = sinc * window;
    }
    let sum: f32 = taps.iter().sum();
    for tap in &mut taps {
        *tap /= sum;
    }
    let half = TAPS / 2;
    (0..input.len())
        .map(|i| {
            let mut acc = 0.0;
            for (k, tap) in taps.iter().enumerate() {
                let idx = i as isize + k as isize - half as isize;
                if idx >= 0 && (idx as usize) < input.len() {
                    acc += input[idx as usize] * tap;
                }
            }
            acc
        })
        .collect()
}

/// Encodes 16 kHz mono samples as an Ogg Opus stream of 60 ms packets.
pub fn encode_ogg_opus(pcm: &[i16]) -> Result<Vec<u8>, ClipError> {
    let enc_err = |e: opus::Error| ClipError::Encode(e.to_string());
    let mut encoder =
        opus::Encoder::new(ENCODE_RATE, opus::Channels::Mono, opus::Application::Audio)
            .map_err(enc_err)?;
    encoder
        .set_bitrate(opus::Bitrate::Bits(BITRATE))
        .map_err(enc_err)?;
    let lookahead = encoder.get_lookahead().map_err(enc_err)?.max(0) as u64;
    let pre_skip = (lookahead * GRANULE_PER_SAMPLE) as u16;
    let serial = 0x7869_7a68; // any; one stream per file
    let mut writer = ogg::PacketWriter::new(Vec::with_capacity(pcm.len() / 4 + 256));
    let io = |e: std::io::Error| ClipError::Encode(e.to_string());

    let mut head = Vec::with_capacity(19);
    head.extend_from_slice(b"OpusHead");
    head.push(1); // version
    head.push(1); // channels
    head.extend_from_slice(&pre_skip.to_le_bytes());
    head.extend_from_slice(&ENCODE_RATE.to_le_bytes()); // input rate, informational
    head.extend_from_slice(&0i16.to_le_bytes()); // output gain
    head.push(0); // channel mapping family 0
    writer
        .write_packet(head, serial, ogg::PacketWriteEndInfo::EndPage, 0)
        .map_err(io)?;
    let vendor = b"xiaozhi-gateway";
    let mut tags = Vec::with_capacity(8 + 4 + vendor.len() + 4);
    tags.extend_from_slice(b"OpusTags");
    tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
    tags.extend_from_slice(vendor);
    tags.extend_from_slice(&0u32.to_le_bytes()); // no comments
    writer
        .write_packet(tags, serial, ogg::PacketWriteEndInfo::EndPage, 0)
        .map_err(io)?;

    // The encoder's lookahead is made up at the end with silence, so the last samples
    // are heard; the pre-skip drops as much at the start.
    let mut padded = pcm.to_vec();
    let total = padded.len() + lookahead as usize;
    padded.resize(total.div_ceil(FRAME) * FRAME, 0);
    let frames = padded.len() / FRAME;
    let mut out = [0u8; 4000];
    for (i, frame) in padded.chunks(FRAME).enumerate() {
        let n = encoder.encode(frame, &mut out).map_err(enc_err)?;
        let last = i + 1 == frames;
        // The end granule is the real length (plus pre-skip), not the padding.
        let granule = if last {
            (pcm.len() as u64 + lookahead) * GRANULE_PER_SAMPLE
        } else {
            ((i + 1) * FRAME) as u64 * GRANULE_PER_SAMPLE
        };
        let info = if last {
            ogg::PacketWriteEndInfo::EndStream
        } else {
            ogg::PacketWriteEndInfo::NormalPacket
        };
        writer
            .write_packet(out[..n].to_vec(), serial, info, granule)
            .map_err(io)?;
    }
    Ok(writer.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAV file of a 440 Hz tone: `secs` long at `rate`, `channels` channels.
    pub(crate) fn tone_wav(rate: u32, channels: u16, secs: f32) -> Vec<u8> {
        let frames = (rate as f32 * secs) as u32;
        let data_len = frames * u32::from(channels) * 2;
        let mut w = Vec::with_capacity(44 + data_len as usize);
        w.extend_from_slice(b"RIFF");
        w.extend_from_slice(&(36 + data_len).to_le_bytes());
        w.extend_from_slice(b"WAVEfmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes());
        w.extend_from_slice(&channels.to_le_bytes());
        w.extend_from_slice(&rate.to_le_bytes());
        w.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
        w.extend_from_slice(&(channels * 2).to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        w.extend_from_slice(b"data");
        w.extend_from_slice(&data_len.to_le_bytes());
        for i in 0..frames {
            let v = ((i as f32 * 440.0 * 2.0 * std::f32::consts::PI / rate as f32).sin() * 12_000.0)
                as i16;
            for _ in 0..channels {
                w.extend_from_slice(&v.to_le_bytes());
            }
        }
        w
    }

    #[test]
    fn a_stereo_wav_becomes_mono_ogg_opus_of_the_same_length_that_decodes() {
        let wav = tone_wav(44_100, 2, 1.5);
        let clip = prepare(&wav, 120_000).unwrap();
        assert_eq!(clip.from, ClipFormat::Wav);
        assert!(
            (1490..=1510).contains(&clip.duration_ms),
            "{}",
            clip.duration_ms
        );
        // What the firmware checks, and the length the stream itself declares.
        let declared = check_ogg_opus(&clip.ogg).unwrap();
        assert!((1490..=1510).contains(&declared), "{declared}");
        // libopus decodes every packet, and the tone is there (not silence).
        let mut reader = ogg::PacketReader::new(Cursor::new(&clip.ogg));
        let mut decoder = opus::Decoder::new(16_000, opus::Channels::Mono).unwrap();
        let mut pcm = vec![0i16; 5760];
        let (mut packets, mut energy) = (0, 0f64);
        while let Some(p) = reader.read_packet().unwrap() {
            if p.data.starts_with(b"Opus") {
                continue;
            }
            let n = decoder.decode(&p.data, &mut pcm, false).unwrap();
            assert_eq!(n, FRAME, "60 ms packets");
            energy += pcm[..n].iter().map(|s| f64::from(*s).powi(2)).sum::<f64>();
            packets += 1;
        }
        assert_eq!(
            packets, 26,
            "1.5 s and the encoder's lookahead in 60 ms packets"
        );
        assert!(
            energy / f64::from(packets * FRAME as i32) > 1e6,
            "the tone survived"
        );
    }

    #[test]
    fn a_mono_ogg_opus_is_kept_as_it_is_and_anything_else_is_refused() {
        let ogg = prepare(&tone_wav(16_000, 1, 0.5), 120_000).unwrap().ogg;
        let kept = prepare(&ogg, 120_000).unwrap();
        assert_eq!((kept.from, &kept.ogg), (ClipFormat::OggOpus, &ogg));
        // A well-formed stream of two channels.
        let mut writer = ogg::PacketWriter::new(Vec::new());
        let mut head = b"OpusHead".to_vec();
        head.extend_from_slice(&[1, 2, 0x38, 0x01, 0x80, 0xBB, 0, 0, 0, 0, 0]);
        writer
            .write_packet(head, 1, ogg::PacketWriteEndInfo::EndPage, 0)
            .unwrap();
        writer
            .write_packet(
                b"OpusTags\0\0\0\0\0\0\0\0".to_vec(),
                1,
                ogg::PacketWriteEndInfo::EndPage,
                0,
            )
            .unwrap();
        writer
            .write_packet(
                vec![0xFC, 0xFF, 0xFE],
                1,
                ogg::PacketWriteEndInfo::EndStream,
                2880,
            )
            .unwrap();
        assert_eq!(
            prepare(&writer.into_inner(), 120_000).unwrap_err(),
            ClipError::NotMono(2)
        );
        assert_eq!(
            prepare(b"hello", 120_000).unwrap_err(),
            ClipError::UnknownFormat
        );
        assert!(matches!(
            prepare(&tone_wav(16_000, 1, 3.0), 2_000),
            Err(ClipError::TooLong(3000, 2000))
        ));
        let mut broken = tone_wav(16_000, 1, 0.5);
        broken.truncate(40);
        assert!(prepare(&broken, 120_000).is_err());
    }

    #[test]
    fn resampling_keeps_the_length_and_removes_what_cannot_be_kept() {
        let rate = 48_000;
        let tone = |hz: f32| -> Vec<f32> {
            (0..rate)
                .map(|i| (i as f32 * hz * 2.0 * std::f32::consts::PI / rate as f32).sin() * 0.5)
                .collect()
        };
        let rms = |s: &[i16]| {
            (s.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / s.len() as f64).sqrt()
        };
        let low = resample(&tone(440.0), rate, 16_000);
        let high = resample(&tone(12_000.0), rate, 16_000);
        assert_eq!(low.len(), 16_000);
        assert!(rms(&low) > 10_000.0, "440 Hz passes: {}", rms(&low));
        assert!(
            rms(&high) < 500.0,
            "12 kHz (above 8 kHz) is filtered, not aliased: {}",
            rms(&high)
        );
    }
}
