//! Where recorded Opus becomes WAV: a few low-priority threads of the gateway's own.
//!
//! Decoding is chat history's one real cost: libopus spends ~25 µs of CPU on a 60 ms
//! frame at 16 kHz (measured here), so a talking device costs ~0.8 ms of decoding a
//! second for its two directions, more than relaying its audio does. The writer used
//! to decode a whole batch on tokio's blocking pool, where it competed on equal terms
//! with the threads that move audio, and a batch of long utterances showed as tens of
//! milliseconds in the audio's p99. Here decoding runs on `history.decode_threads`
//! dedicated threads, each at nice [`DECODE_NICE`], so the kernel gives the audio path
//! the CPU first and decoding takes what is left (a nice-10 thread still gets about a
//! tenth of a busy core, so records keep flowing under load instead of starving).
//!
//! Work is handed over one utterance at a time through a bounded queue; the writer waits
//! for each result, so no more decoded audio is in memory than the writer asked for.
//! The threads end when the pool is dropped (the queue closes).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::audio::opus_to_wav;
use super::record::OpusAudio;

/// Nice value of the decoding threads (0 is the default, 19 the lowest priority).
pub const DECODE_NICE: i32 = 10;

/// Utterances waiting for a decoding thread.
const QUEUE: usize = 64;

struct Job {
    audio: OpusAudio,
    reply: oneshot::Sender<Option<Vec<u8>>>,
}

/// The decoding threads; cheap to clone, ends them when the last clone is dropped.
#[derive(Clone)]
pub struct WavDecoder {
    jobs: mpsc::Sender<Job>,
}

impl WavDecoder {
    /// Starts `threads` decoding threads (at least one).
    pub fn start(threads: usize) -> std::io::Result<WavDecoder> {
        let (jobs, rx) = mpsc::channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("xz-decode-{n}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // One thread waits on the queue at a time; the others wait for
                        // the lock, which amounts to the same.
                        let job = match rx.lock() {
                            Ok(mut rx) => rx.blocking_recv(),
                            Err(_) => None,
                        };
                        let Some(job) = job else { break };
                        let wav = opus_to_wav(&job.audio.packets, job.audio.sample_rate)
                            .ok()
                            .map(|wav| wav.bytes);
                        let _ = job.reply.send(wav);
                    }
                })?;
        }
        Ok(WavDecoder { jobs })
    }

    /// Decodes one utterance to a WAV file; `None` if libopus refused to start a decoder
    /// (or the threads are gone).
    pub async fn decode(&self, audio: OpusAudio) -> Option<Vec<u8>> {
        let (reply, result) = oneshot::channel();
        self.jobs.send(Job { audio, reply }).await.ok()?;
        result.await.ok().flatten()
    }
}

/// Puts the calling thread at [`DECODE_NICE`]; a failure (a sandbox that forbids it)
/// only costs the priority, so it is logged and ignored.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take and return plain integers and touch no
        // memory of ours; on Linux, PRIO_PROCESS with a thread id sets that thread's
        // nice value only.
        let result = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, DECODE_NICE)
        };
        if result != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "history decoder: cannot lower the thread's priority"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::audio::wav_info;

    fn nice_of(thread_name: &str) -> Option<i32> {
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if comm.trim() == thread_name {
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // Field 19 is the nice value; fields after the ")" of the name.
                let after = &stat[stat.rfind(')')? + 2..];
                return after.split(' ').nth(16)?.parse().ok();
            }
        }
        None
    }

    #[tokio::test]
    async fn decodes_utterances_on_low_priority_threads() {
        let decoder = WavDecoder::start(2).unwrap();
        // 20 TOC-only SILK WB 60 ms frames: concealed, but as long as announced.
        let audio = OpusAudio {
            sample_rate: 16_000,
            packets: std::iter::repeat_n([11u8 << 3], 20).collect(),
        };
        let results =
            futures_util::future::join_all((0..8).map(|_| decoder.decode(audio.clone()))).await;
        for wav in results {
            let info = wav_info(&wav.expect("decoded")).unwrap();
            assert_eq!((info.sample_rate, info.duration_ms), (16_000, 1_200));
        }
        if cfg!(target_os = "linux") {
            assert_eq!(nice_of("xz-decode-0"), Some(DECODE_NICE));
            assert_eq!(nice_of("xz-decode-1"), Some(DECODE_NICE));
        }
    }
}
