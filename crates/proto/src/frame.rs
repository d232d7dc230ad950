//! Frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.
//!
//! A frame longer than [`MAX_FRAME_LEN`] is refused before anything is allocated for it, so a
//! peer that announces a gigabyte costs the reader four bytes.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame either side accepts: 16 MiB.
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("the connection was closed")]
    Closed,
    /// The peer announced a frame over the limit.
    #[error("a frame of {len} bytes was announced; the limit is {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit, [`MAX_FRAME_LEN`].
        max: u32,
    },
    /// The frame's bytes are not the JSON message expected.
    #[error("a frame did not hold a valid message: {0}")]
    Malformed(#[source] serde_json::Error),
    /// Reading or writing the socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Serializes `message` into one frame, length prefix included.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut bytes = Vec::new();
    append(&mut bytes, message)?;
    Ok(bytes)
}

/// Appends `message` to `bytes` as one frame, length prefix included; on an error `bytes` is as
/// it was.
pub fn append<T: Serialize>(bytes: &mut Vec<u8>, message: &T) -> Result<(), FrameError> {
    let start = bytes.len();
    bytes.extend_from_slice(&[0; 4]);
    if let Err(e) = serde_json::to_writer(&mut *bytes, message) {
        bytes.truncate(start);
        return Err(FrameError::Malformed(e));
    }
    let len = bytes.len() - start - 4;
    if len > MAX_FRAME_LEN as usize {
        bytes.truncate(start);
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    bytes[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Checks an announced frame length against the limit.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len as usize)
}

/// Parses a frame's body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Malformed)
}

/// Writes one frame and flushes it.
pub fn write<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame; [`FrameError::Closed`] when the peer closed cleanly before its first byte.
pub fn read<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<T, FrameError> {
    let mut prefix = [0; 4];
    let mut filled = 0;
    while filled < 4 {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut body = vec![0; check_len(prefix)?];
    reader.read_exact(&mut body)?;
    decode(&body)
}

/// The same operations on tokio streams.
#[cfg(feature = "tokio")]
pub mod tokio_io {
    use std::io;

    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{FrameError, check_len, decode, encode};

    /// Writes one frame and flushes it.
    pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
        writer: &mut W,
        message: &T,
    ) -> Result<(), FrameError> {
        writer.write_all(&encode(message)?).await?;
        writer.flush().await?;
        Ok(())
    }

    /// Reads one frame; [`FrameError::Closed`] when the peer closed cleanly between frames.
    pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(
        reader: &mut R,
    ) -> Result<T, FrameError> {
        let mut prefix = [0; 4];
        let mut filled = 0;
        while filled < 4 {
            match reader.read(&mut prefix[filled..]).await? {
                0 if filled == 0 => return Err(FrameError::Closed),
                0 => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
                n => filled += n,
            }
        }
        let mut body = vec![0; check_len(prefix)?];
        reader.read_exact(&mut body).await?;
        decode(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_message() {
        let bytes = encode(&vec!["a", "b"]).unwrap();
        assert_eq!(&bytes[..4], &9u32.to_be_bytes());
        let back: Vec<String> = read(&mut &bytes[..]).unwrap();
        assert_eq!(back, ["a", "b"]);
    }

    #[test]
    fn refuses_an_oversized_announcement_without_reading_it() {
        let announced = (1u32 << 30).to_be_bytes();
        let err = read::<_, serde_json::Value>(&mut &announced[..]).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, .. } if len == 1 << 30),
            "{err}"
        );
    }

    #[test]
    fn tells_a_clean_close_from_a_torn_frame() {
        assert!(matches!(
            read::<_, serde_json::Value>(&mut &[][..]),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read::<_, serde_json::Value>(&mut &[0, 0][..]),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read::<_, serde_json::Value>(&mut &[0, 0, 0, 3, b'{'][..]),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn reports_garbage_as_malformed() {
        let frame = [0, 0, 0, 3, b'x', b'y', b'z'];
        assert!(matches!(
            read::<_, serde_json::Value>(&mut &frame[..]),
            Err(FrameError::Malformed(_))
        ));
    }
}
