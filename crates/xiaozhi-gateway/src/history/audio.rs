//! Turning a conversation's Opus frames into the WAV files chat history stores.
//!
//! manager-api's `ai_agent_chat_audio.audio` column holds a complete WAV file (RIFF,
//! PCM s16le, 16 kHz, mono). The gateway sees each user turn as the uplink Opus frames
//! the device sent and each assistant sentence as the downlink Opus frames the server
//! sent; this module accumulates those frames ([`TurnAudio`]), decodes them into such a
//! WAV ([`opus_to_wav`]) and reads WAV headers back ([`wav_info`]).
//!
//! Frames come from devices and servers and may be damaged, or not real Opus at all (the
//! project's simulator sends frames that only have a valid TOC byte). The recording must
//! still be as long as the audio that was sent, so a packet that cannot be decoded is
//! replaced by the decoder's packet-loss concealment for the duration its TOC byte
//! announces (RFC 6716 §3.1). A packet whose TOC cannot be read at all (empty, a
//! truncated code-3 header, more than 120 ms) is assumed to last as long as the previous
//! packet — 60 ms, the xiaozhi default, before any packet could be read.
//! [`TurnAudio::duration_ms`] applies the same rule, so it always equals the duration of
//! the WAV made from the packets it holds. Nothing here panics on any input.

use opus::{Channels, Decoder};

use super::opus_packets::OpusPackets;

/// Sample rate of the stored WAV files (what manager-api expects).
pub const WAV_SAMPLE_RATE: u32 = 16_000;

/// Length of the canonical RIFF/WAVE header [`encode_wav`] writes.
pub const WAV_HEADER_LEN: usize = 44;

/// Default cap on one utterance's recording, in seconds.
pub const DEFAULT_MAX_TURN_SECS: u32 = 120;

/// Longest Opus packet (120 ms), in samples at [`WAV_SAMPLE_RATE`].
const MAX_PACKET_SAMPLES: usize = (WAV_SAMPLE_RATE as usize) * 120 / 1000;

/// Longest Opus packet (120 ms), in samples at 48 kHz.
const MAX_PACKET_SAMPLES_48K: u32 = 5_760;

/// Duration assumed for a packet whose TOC cannot be read before any packet could be:
/// 60 ms (the xiaozhi default frame duration), in samples at 48 kHz.
const DEFAULT_PACKET_SAMPLES_48K: u32 = 2_880;

/// Highest Opus bitrate (510 kbit/s) rounded up, in bytes per second: bounds the memory
/// one [`TurnAudio`] may hold, whatever the packets claim about their duration.
const MAX_OPUS_BYTES_PER_SEC: u64 = 64_000;

/// Largest data chunk a RIFF file can describe.
const MAX_WAV_DATA_LEN: usize = (u32::MAX as usize) - (WAV_HEADER_LEN - 8);

/// Errors from decoding Opus or reading a WAV header.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// libopus refused to create a decoder.
    #[error("opus decoder: {0}")]
    Decoder(#[from] opus::Error),
    /// The file does not start with `RIFF`.
    #[error("not a RIFF file")]
    NotRiff,
    /// The RIFF form type is not `WAVE`.
    #[error("RIFF file is not WAVE")]
    NotWave,
    /// The file ends before what its header announces.
    #[error("WAV truncated: {0}")]
    Truncated(&'static str),
    /// A required chunk is absent.
    #[error("WAV has no {0:?} chunk")]
    MissingChunk(&'static str),
    /// The `fmt ` chunk's format tag is not PCM (1).
    #[error("unsupported WAV format tag {0} (only PCM = 1)")]
    UnsupportedFormat(u16),
    /// Header fields contradict each other.
    #[error("inconsistent WAV header: {0}")]
    Inconsistent(&'static str),
}

/// Samples (at 48 kHz) an Opus packet holds according to its TOC byte and, for code 3,
/// its frame-count byte (RFC 6716 §3.1–3.2); `None` if that cannot be read or the packet
/// would exceed 120 ms (what libopus also rejects). The payload is not looked at.
pub fn packet_samples_48k(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame sizes at 48 kHz: SILK 10/20/40/60 ms, Hybrid 10/20 ms, CELT 2.5/5/10/20 ms.
    let frame: u32 = match config {
        0..=11 => [480, 960, 1_920, 2_880][usize::from(config & 3)],
        12..=15 => [480, 960][usize::from(config & 1)],
        _ => [120, 240, 480, 960][usize::from(config & 3)],
    };
    let frames: u32 = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    let total = frame * frames;
    (frames > 0 && total <= MAX_PACKET_SAMPLES_48K).then_some(total)
}

/// Accumulates the Opus packets of one utterance, up to a cap.
///
/// Once a packet would take the recording beyond the cap (in duration, or in bytes at
/// Opus's highest bitrate), it and every later packet are dropped and counted, so what
/// is kept is always a contiguous prefix of the utterance.
#[derive(Debug, Clone)]
pub struct TurnAudio {
    packets: OpusPackets,
    samples_48k: u64,
    bytes: u64,
    last_packet_48k: u32,
    max_samples_48k: u64,
    max_bytes: u64,
    full: bool,
    dropped: u64,
}

impl Default for TurnAudio {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TURN_SECS)
    }
}

impl TurnAudio {
    /// An empty recording capped at `max_secs` seconds (0 keeps nothing).
    pub fn new(max_secs: u32) -> Self {
        Self {
            packets: OpusPackets::default(),
            samples_48k: 0,
            bytes: 0,
            last_packet_48k: DEFAULT_PACKET_SAMPLES_48K,
            max_samples_48k: u64::from(max_secs) * 48_000,
            max_bytes: u64::from(max_secs) * MAX_OPUS_BYTES_PER_SEC,
            full: false,
            dropped: 0,
        }
    }

    /// Records one packet, or drops and counts it if the cap has been reached.
    pub fn push(&mut self, packet: &[u8]) {
        let samples = packet_samples_48k(packet).unwrap_or(self.last_packet_48k);
        let len = packet.len() as u64;
        if self.full
            || self.samples_48k + u64::from(samples) > self.max_samples_48k
            || self.bytes + len > self.max_bytes
        {
            self.full = true;
            self.dropped += 1;
            return;
        }
        self.last_packet_48k = samples;
        self.samples_48k += u64::from(samples);
        self.bytes += len;
        self.packets.push(packet);
    }

    /// Duration of the recorded packets, in milliseconds (rounded down); equals the
    /// `duration_ms` of the WAV [`opus_to_wav`] makes from them.
    pub fn duration_ms(&self) -> u64 {
        self.samples_48k / 48
    }

    /// Whether no packet has been recorded.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Number of packets recorded.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Packets dropped because the cap had been reached (read it before [`Self::take`]).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Takes the recorded packets and starts over (empty, dropped count reset, same cap).
    pub fn take(&mut self) -> OpusPackets {
        let fresh = Self {
            max_samples_48k: self.max_samples_48k,
            max_bytes: self.max_bytes,
            ..Self::new(0)
        };
        std::mem::replace(self, fresh).packets
    }
}

/// A WAV file made by [`opus_to_wav`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wav {
    /// The complete file: 44-byte header + PCM s16le 16 kHz mono.
    pub bytes: Vec<u8>,
    /// Duration of the audio, in milliseconds (rounded down).
    pub duration_ms: u64,
    /// Packets libopus decoded.
    pub decoded: usize,
    /// Packets replaced by concealment (or silence) because they could not be decoded.
    pub concealed: usize,
}

/// What a WAV header says, as read by [`wav_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    pub sample_rate: u32,
    pub channels: u16,
    pub bits_per_sample: u16,
    /// Offset of the first sample in the file.
    pub data_offset: usize,
    /// Length of the sample data, in bytes.
    pub data_len: usize,
    /// Duration of the audio, in milliseconds (rounded down).
    pub duration_ms: u64,
}

/// Writes the canonical 44-byte header for `data_len` bytes of PCM s16le mono.
fn write_header(header: &mut [u8], data_len: u32, sample_rate: u32) {
    header[0..4].copy_from_slice(b"RIFF");
    header[4..8].copy_from_slice(&data_len.saturating_add(36).to_le_bytes());
    header[8..12].copy_from_slice(b"WAVE");
    header[12..16].copy_from_slice(b"fmt ");
    header[16..20].copy_from_slice(&16u32.to_le_bytes());
    header[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    header[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
    header[24..28].copy_from_slice(&sample_rate.to_le_bytes());
    header[28..32].copy_from_slice(&sample_rate.wrapping_mul(2).to_le_bytes()); // byte rate
    header[32..34].copy_from_slice(&2u16.to_le_bytes()); // block align
    header[34..36].copy_from_slice(&16u16.to_le_bytes()); // bits per sample
    header[36..40].copy_from_slice(b"data");
    header[40..44].copy_from_slice(&data_len.to_le_bytes());
}

/// A complete WAV file (canonical 44-byte RIFF/WAVE header, PCM 1 channel 16-bit) holding
/// `pcm`. Samples beyond what a RIFF file can describe (4 GiB) are left out.
pub fn encode_wav(pcm: &[i16], sample_rate: u32) -> Vec<u8> {
    let pcm = &pcm[..pcm.len().min(MAX_WAV_DATA_LEN / 2)];
    let mut bytes = vec![0; WAV_HEADER_LEN];
    bytes.reserve_exact(pcm.len() * 2);
    for s in pcm {
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    write_header(&mut bytes, (pcm.len() * 2) as u32, sample_rate);
    bytes
}

/// Decodes one utterance's Opus packets into a 16 kHz mono WAV.
///
/// libopus decodes any Opus stream at 16 kHz whatever rate it was encoded at, so
/// `input_sample_rate` (the rate the `hello` announced) is only logged. A packet that
/// does not decode becomes packet-loss concealment (or, failing that, silence) for the
/// duration its TOC announces, see the module documentation.
pub fn opus_to_wav<I>(packets: I, input_sample_rate: u32) -> Result<Wav, AudioError>
where
    I: IntoIterator + Clone,
    I::Item: AsRef<[u8]>,
{
    let mut decoder = Decoder::new(WAV_SAMPLE_RATE, Channels::Mono)?;
    let mut pcm = [0i16; MAX_PACKET_SAMPLES];

    let mut last_packet_48k = DEFAULT_PACKET_SAMPLES_48K;
    let expected_samples: usize = packets
        .clone()
        .into_iter()
        .map(|p| {
            last_packet_48k = packet_samples_48k(p.as_ref()).unwrap_or(last_packet_48k);
            last_packet_48k as usize / 3
        })
        .sum();
    let mut bytes = vec![0u8; WAV_HEADER_LEN];
    bytes.reserve_exact(expected_samples.min(MAX_WAV_DATA_LEN / 2) * 2);

    let (mut decoded, mut concealed) = (0, 0);
    let mut last_packet_48k = DEFAULT_PACKET_SAMPLES_48K;
    for packet in packets {
        let packet = packet.as_ref();
        let seen = decoded + concealed;
        let toc_samples = packet_samples_48k(packet);
        let want = toc_samples.unwrap_or(last_packet_48k) as usize / 3;
        last_packet_48k = toc_samples.unwrap_or(last_packet_48k);

        // libopus would reject a packet whose TOC does not parse; the opus crate panics
        // on lengths beyond i32.
        let decodable = toc_samples.is_some() && i32::try_from(packet.len()).is_ok();
        let n = match decodable.then(|| decoder.decode(packet, &mut pcm, false)) {
            Some(Ok(n)) if n > 0 && n <= pcm.len() => {
                decoded += 1;
                n
            }
            _ => {
                concealed += 1;
                match decoder.decode(&[], &mut pcm[..want], false) {
                    Ok(n) if n == want => {}
                    _ => pcm[..want].fill(0),
                }
                want
            }
        };
        if bytes.len() - WAV_HEADER_LEN + n * 2 > MAX_WAV_DATA_LEN {
            tracing::warn!(
                packets = seen,
                "opus_to_wav: audio exceeds what a WAV file can hold; truncated"
            );
            break;
        }
        for s in &pcm[..n] {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
    }

    let data_len = bytes.len() - WAV_HEADER_LEN;
    write_header(&mut bytes, data_len as u32, WAV_SAMPLE_RATE);
    let duration_ms = (data_len / 2) as u64 * 1000 / u64::from(WAV_SAMPLE_RATE);
    tracing::debug!(
        input_sample_rate,
        decoded,
        concealed,
        duration_ms,
        "opus_to_wav"
    );
    Ok(Wav {
        bytes,
        duration_ms,
        decoded,
        concealed,
    })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads and validates a RIFF/WAVE PCM header: `RIFF` + `WAVE`, a `fmt ` chunk with
/// format 1 whose channels, rate, bits, block align and byte rate agree, and a `data`
/// chunk that fits in the file and holds whole sample frames. Other chunks are skipped.
pub fn wav_info(bytes: &[u8]) -> Result<WavInfo, AudioError> {
    if bytes.len() < 12 {
        return Err(match bytes.get(..4) {
            Some(id) if id != b"RIFF" => AudioError::NotRiff,
            _ => AudioError::Truncated("shorter than a RIFF header"),
        });
    }
    if &bytes[0..4] != b"RIFF" {
        return Err(AudioError::NotRiff);
    }
    if &bytes[8..12] != b"WAVE" {
        return Err(AudioError::NotWave);
    }
    let riff_end = (u32_at(bytes, 4) as usize).saturating_add(8);
    if riff_end > bytes.len() {
        return Err(AudioError::Truncated("RIFF size exceeds the file"));
    }

    let mut fmt = None;
    let mut data = None;
    let mut pos = 12;
    while pos + 8 <= riff_end && (fmt.is_none() || data.is_none()) {
        let id = &bytes[pos..pos + 4];
        let size = u32_at(bytes, pos + 4) as usize;
        let body = pos + 8;
        let end = body.saturating_add(size);
        if end > riff_end {
            return Err(AudioError::Truncated(if id == b"data" {
                "data chunk exceeds the file"
            } else {
                "chunk exceeds the file"
            }));
        }
        match id {
            b"fmt " if fmt.is_none() => {
                if size < 16 {
                    return Err(AudioError::Inconsistent("fmt chunk shorter than 16 bytes"));
                }
                fmt = Some(body);
            }
            b"data" if data.is_none() => data = Some((body, size)),
            _ => {}
        }
        pos = end.saturating_add(size & 1);
    }
    let fmt = fmt.ok_or(AudioError::MissingChunk("fmt "))?;
    let (data_offset, data_len) = data.ok_or(AudioError::MissingChunk("data"))?;

    let format = u16_at(bytes, fmt);
    let channels = u16_at(bytes, fmt + 2);
    let sample_rate = u32_at(bytes, fmt + 4);
    let byte_rate = u32_at(bytes, fmt + 8);
    let block_align = u16_at(bytes, fmt + 12);
    let bits_per_sample = u16_at(bytes, fmt + 14);
    if format != 1 {
        return Err(AudioError::UnsupportedFormat(format));
    }
    if channels == 0 {
        return Err(AudioError::Inconsistent("zero channels"));
    }
    if sample_rate == 0 {
        return Err(AudioError::Inconsistent("zero sample rate"));
    }
    if bits_per_sample == 0 || !bits_per_sample.is_multiple_of(8) {
        return Err(AudioError::Inconsistent(
            "bits per sample not a whole number of bytes",
        ));
    }
    let frame_len = u32::from(channels) * u32::from(bits_per_sample / 8);
    if u32::from(block_align) != frame_len {
        return Err(AudioError::Inconsistent(
            "block align != channels x bytes per sample",
        ));
    }
    if u64::from(byte_rate) != u64::from(sample_rate) * u64::from(frame_len) {
        return Err(AudioError::Inconsistent(
            "byte rate != sample rate x block align",
        ));
    }
    if !data_len.is_multiple_of(frame_len as usize) {
        return Err(AudioError::Inconsistent(
            "data is not a whole number of sample frames",
        ));
    }
    let frames = (data_len / frame_len as usize) as u64;
    Ok(WavInfo {
        sample_rate,
        channels,
        bits_per_sample,
        data_offset,
        data_len,
        duration_ms: frames * 1000 / u64::from(sample_rate),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opus::{Application, Encoder};
    use proptest::prelude::*;

    /// `count` 60 ms frames of a 440 Hz sine encoded at `rate`.
    fn sine_packets(rate: u32, count: usize) -> Vec<Vec<u8>> {
        let mut enc = Encoder::new(rate, Channels::Mono, Application::Voip).unwrap();
        let frame = rate as usize * 60 / 1000;
        (0..count)
            .map(|i| {
                let pcm: Vec<i16> = (0..frame)
                    .map(|j| {
                        let t = (i * frame + j) as f64 / f64::from(rate);
                        (8_000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
                    })
                    .collect();
                enc.encode_vec(&pcm, 4_000).unwrap()
            })
            .collect()
    }

    fn samples(wav: &[u8]) -> Vec<i16> {
        let info = wav_info(wav).unwrap();
        wav[info.data_offset..info.data_offset + info.data_len]
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    fn rms(s: &[i16]) -> f64 {
        (s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / s.len().max(1) as f64).sqrt()
    }

    fn check_header(wav: &Wav) -> WavInfo {
        let info = wav_info(&wav.bytes).unwrap();
        assert_eq!(info.sample_rate, 16_000);
        assert_eq!(info.channels, 1);
        assert_eq!(info.bits_per_sample, 16);
        assert_eq!(info.data_offset, WAV_HEADER_LEN);
        assert_eq!(info.duration_ms, wav.duration_ms);
        info
    }

    /// Deterministic pseudo-random bytes (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn roundtrip_real(rate: u32) {
        let packets = sine_packets(rate, 25);
        let wav = opus_to_wav(&packets, rate).unwrap();
        let info = check_header(&wav);
        assert_eq!(info.duration_ms, 25 * 60);
        assert_eq!(info.data_len, 25 * 960 * 2);
        assert_eq!((wav.decoded, wav.concealed), (25, 0));
        let s = samples(&wav.bytes);
        assert!(rms(&s) > 2_000.0, "rms {}", rms(&s));

        let mut turn = TurnAudio::default();
        for p in &packets {
            turn.push(p);
        }
        assert_eq!(turn.duration_ms(), wav.duration_ms);
    }

    #[test]
    fn real_opus_16k_roundtrip() {
        roundtrip_real(16_000);
    }

    #[test]
    fn real_opus_24k_roundtrip() {
        roundtrip_real(24_000);
    }

    #[test]
    fn synthetic_toc_only_frames_keep_their_duration() {
        // TOC 0x18: SILK NB 60 ms, code 0, then arbitrary bytes.
        let nb: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                let mut p = noise(u64::from(i) + 7, 40);
                p[0] = 0x18;
                p
            })
            .collect();
        // TOC 0x58: SILK WB 60 ms, the kind of frame the project's simulator sends.
        let sim: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                let mut p = noise(u64::from(i) + 91, 40);
                p[0] = 0x58;
                p
            })
            .collect();
        for packets in [nb, sim] {
            let wav = opus_to_wav(&packets, 16_000).unwrap();
            check_header(&wav);
            assert_eq!(wav.duration_ms, 20 * 60);
            assert_eq!(wav.decoded + wav.concealed, 20);
        }
    }

    #[test]
    fn damaged_frames_in_a_real_stream_keep_the_duration() {
        let mut packets = sine_packets(16_000, 30);
        packets[3].clear(); // empty
        packets[7].truncate(1); // TOC only
        packets[11][0] |= 3; // code 3 ...
        packets[11].truncate(1); // ... without its frame-count byte: unreadable TOC
        for b in &mut packets[15][1..] {
            *b ^= 0x5a; // payload garbage behind a valid TOC
        }
        packets[20] = vec![0xff; 3]; // code 3 with 63 frames: > 120 ms, invalid
        let wav = opus_to_wav(&packets, 16_000).unwrap();
        check_header(&wav);
        assert_eq!(wav.duration_ms, 30 * 60);
        assert!(wav.concealed >= 3, "{} concealed", wav.concealed);
    }

    #[test]
    fn empty_packets_are_concealed_as_lost_frames() {
        let packets = vec![Vec::<u8>::new(); 10];
        let wav = opus_to_wav(&packets, 16_000).unwrap();
        check_header(&wav);
        assert_eq!(wav.duration_ms, 600);
        assert_eq!((wav.decoded, wav.concealed), (0, 10));
        assert!(samples(&wav.bytes).iter().all(|&s| s == 0));
        let none: [&[u8]; 0] = [];
        let wav = opus_to_wav(&none, 16_000).unwrap();
        assert_eq!(check_header(&wav).data_len, 0);
    }

    #[test]
    fn random_packets_match_turn_audio_duration() {
        let packets: Vec<Vec<u8>> = (0..200)
            .map(|i| noise(i * 31 + 1, (i as usize * 7) % 300))
            .collect();
        let wav = opus_to_wav(&packets, 16_000).unwrap();
        check_header(&wav);
        let mut turn = TurnAudio::default();
        for p in &packets {
            turn.push(p);
        }
        assert_eq!(turn.dropped(), 0);
        assert_eq!(wav.duration_ms, turn.duration_ms());
        assert_eq!(wav.decoded + wav.concealed, packets.len());
    }

    #[test]
    fn toc_durations_follow_rfc_6716() {
        assert_eq!(packet_samples_48k(&[0x18]), Some(2_880)); // SILK NB 60 ms
        assert_eq!(packet_samples_48k(&[11 << 3]), Some(2_880)); // SILK WB 60 ms
        assert_eq!(packet_samples_48k(&[8 << 3]), Some(480)); // SILK WB 10 ms
        assert_eq!(packet_samples_48k(&[13 << 3 | 1]), Some(1_920)); // Hybrid 20 ms x2
        assert_eq!(packet_samples_48k(&[16 << 3]), Some(120)); // CELT 2.5 ms
        assert_eq!(packet_samples_48k(&[31 << 3 | 3, 6]), Some(5_760)); // 6 x 20 ms
        assert_eq!(packet_samples_48k(&[31 << 3 | 3, 7]), None); // 140 ms
        assert_eq!(packet_samples_48k(&[31 << 3 | 3, 0]), None); // no frames
        assert_eq!(packet_samples_48k(&[3]), None); // code 3, no count byte
        assert_eq!(packet_samples_48k(&[]), None);
    }

    #[test]
    fn encode_wav_writes_the_canonical_header() {
        let wav = encode_wav(&[1, -2, 3], 16_000);
        assert_eq!(wav.len(), 50);
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(u32_at(&wav, 4), 42);
        assert_eq!(&wav[8..16], b"WAVEfmt ");
        assert_eq!(u32_at(&wav, 16), 16);
        assert_eq!(u16_at(&wav, 20), 1);
        assert_eq!(u16_at(&wav, 22), 1);
        assert_eq!(u32_at(&wav, 24), 16_000);
        assert_eq!(u32_at(&wav, 28), 32_000);
        assert_eq!(u16_at(&wav, 32), 2);
        assert_eq!(u16_at(&wav, 34), 16);
        assert_eq!(&wav[36..40], b"data");
        assert_eq!(u32_at(&wav, 40), 6);
        assert_eq!(&wav[44..], &[1, 0, 0xfe, 0xff, 3, 0]);
        assert_eq!(samples(&wav), vec![1, -2, 3]);
    }

    #[test]
    fn wav_info_rejects_bad_headers() {
        let good = encode_wav(&[0; 1_600], 16_000);
        assert_eq!(wav_info(&good).unwrap().duration_ms, 100);

        for cut in [0, 3, 11, 20, 43, 44, good.len() - 1] {
            assert!(
                matches!(wav_info(&good[..cut]), Err(AudioError::Truncated(_))),
                "cut at {cut}: {:?}",
                wav_info(&good[..cut])
            );
        }

        let mut rifx = good.clone();
        rifx[..4].copy_from_slice(b"RIFX");
        assert!(matches!(wav_info(&rifx), Err(AudioError::NotRiff)));
        assert!(matches!(wav_info(b"hello"), Err(AudioError::NotRiff)));
        let mut avi = good.clone();
        avi[8..12].copy_from_slice(b"AVI ");
        assert!(matches!(wav_info(&avi), Err(AudioError::NotWave)));

        // Claims stereo while block align and byte rate are mono's.
        let mut stereo = good.clone();
        stereo[22] = 2;
        assert!(matches!(
            wav_info(&stereo),
            Err(AudioError::Inconsistent(_))
        ));
        // Claims stereo with a consistent fmt chunk but an odd number of samples.
        let mut odd = encode_wav(&[0; 3], 16_000);
        odd[22] = 2;
        odd[28..32].copy_from_slice(&64_000u32.to_le_bytes());
        odd[32] = 4;
        assert!(matches!(wav_info(&odd), Err(AudioError::Inconsistent(_))));
        // An honest stereo header is reported as such.
        let mut honest = encode_wav(&[0; 4], 16_000);
        honest[22] = 2;
        honest[28..32].copy_from_slice(&64_000u32.to_le_bytes());
        honest[32] = 4;
        assert_eq!(wav_info(&honest).unwrap().channels, 2);

        let mut float = good.clone();
        float[20] = 3;
        assert!(matches!(
            wav_info(&float),
            Err(AudioError::UnsupportedFormat(3))
        ));

        let mut long_data = good.clone();
        long_data[40..44].copy_from_slice(&4_000u32.to_le_bytes());
        assert!(matches!(
            wav_info(&long_data),
            Err(AudioError::Truncated(_))
        ));

        let mut no_data = good[..36].to_vec();
        no_data[4..8].copy_from_slice(&28u32.to_le_bytes());
        assert!(matches!(
            wav_info(&no_data),
            Err(AudioError::MissingChunk("data"))
        ));

        // Unknown chunks before data are skipped.
        let mut list = good[..36].to_vec();
        list.extend_from_slice(b"LIST\x03\0\0\0abc\0");
        list.extend_from_slice(&good[36..]);
        let n = (list.len() - 8) as u32;
        list[4..8].copy_from_slice(&n.to_le_bytes());
        let info = wav_info(&list).unwrap();
        assert_eq!((info.data_offset, info.duration_ms), (56, 100));
    }

    #[test]
    fn turn_audio_caps_duration() {
        let packet = [0x18u8, 1, 2, 3]; // 60 ms
        let mut turn = TurnAudio::new(1);
        assert!(turn.is_empty());
        for _ in 0..20 {
            turn.push(&packet);
        }
        assert_eq!(turn.len(), 16);
        assert_eq!(turn.duration_ms(), 960);
        assert_eq!(turn.dropped(), 4);
        // Once full, even a packet that would fit is dropped: the recording stays contiguous.
        turn.push(&[16 << 3]);
        assert_eq!((turn.len(), turn.dropped()), (16, 5));

        let packets = turn.take();
        assert_eq!(packets.len(), 16);
        assert!(turn.is_empty());
        assert_eq!((turn.duration_ms(), turn.dropped()), (0, 0));
        turn.push(&packet);
        assert_eq!(turn.duration_ms(), 60);
        assert_eq!(opus_to_wav(&packets, 16_000).unwrap().duration_ms, 960);

        let mut nothing = TurnAudio::new(0);
        nothing.push(&packet);
        assert!(nothing.is_empty());
        assert_eq!(nothing.dropped(), 1);
    }

    #[test]
    fn turn_audio_caps_bytes() {
        // 2.5 ms CELT frames of 1275 bytes: 1 s of them is far more than Opus's top bitrate.
        let mut packet = vec![0u8; 1_275];
        packet[0] = 16 << 3;
        let mut turn = TurnAudio::new(1);
        for _ in 0..400 {
            turn.push(&packet);
        }
        assert_eq!(turn.len(), 50);
        assert_eq!(turn.dropped(), 350);
    }

    #[test]
    fn turn_audio_unreadable_toc_lasts_like_the_previous_packet() {
        let mut turn = TurnAudio::default();
        turn.push(&[]);
        assert_eq!(turn.duration_ms(), 60);
        turn.push(&[16 << 3 | 1]); // 2 x 2.5 ms
        turn.push(&[]);
        assert_eq!(turn.duration_ms(), 70);
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..40)
        ) {
            let wav = opus_to_wav(&packets, 16_000).unwrap();
            let info = check_header(&wav);
            prop_assert_eq!(info.data_len, wav.bytes.len() - WAV_HEADER_LEN);
            prop_assert_eq!(wav.decoded + wav.concealed, packets.len());
            let mut turn = TurnAudio::default();
            for p in &packets {
                turn.push(p);
            }
            prop_assert_eq!(turn.duration_ms(), wav.duration_ms);
        }

        #[test]
        fn toc_parser_agrees_with_libopus(packet in proptest::collection::vec(any::<u8>(), 1..8)) {
            let ours = packet_samples_48k(&packet).map(|n| n as usize);
            // libopus reports 0 samples for a code-3 packet announcing 0 frames; it cannot
            // decode one either.
            let theirs = opus::packet::get_nb_samples(&packet, 48_000).ok().filter(|&n| n > 0);
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn wav_info_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = wav_info(&bytes);
            let mut riff = b"RIFF\0\0\0\0WAVE".to_vec();
            riff.extend_from_slice(&bytes);
            let _ = wav_info(&riff);
        }

        #[test]
        fn encode_wav_roundtrips(pcm in proptest::collection::vec(any::<i16>(), 0..500), rate in 1u32..200_000) {
            let wav = encode_wav(&pcm, rate);
            let info = wav_info(&wav).unwrap();
            prop_assert_eq!(info.sample_rate, rate);
            prop_assert_eq!(info.data_len, pcm.len() * 2);
            prop_assert_eq!(samples(&wav), pcm);
        }
    }
}
