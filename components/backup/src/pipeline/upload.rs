//! Multipart upload with bounded parallelism and a guaranteed abort.
//!
//! object_store's `WriteMultipart` cannot abort once `finish` has failed
//! (it consumes the upload), which would leave a dangling S3 multipart
//! upload whenever the final CompleteMultipartUpload fails. This is the same
//! idea with the upload kept until the end: parts of `part_size` bytes are
//! sent as soon as they fill, at most `concurrency` at a time (the caller
//! waits for capacity before handing over more, which is the pipeline's
//! backpressure), and every failure path ends in `abort`.

use bytes::Bytes;
use object_store::{MultipartUpload, PutPayload, PutPayloadMut, PutResult};
use tokio::task::JoinSet;

/// An in-progress multipart upload.
pub struct PartUploader {
    upload: Box<dyn MultipartUpload>,
    buffer: PutPayloadMut,
    part_size: usize,
    concurrency: usize,
    tasks: JoinSet<object_store::Result<()>>,
    parts: usize,
}

impl PartUploader {
    /// Wraps `upload`, sending parts of `part_size` bytes, `concurrency` at once.
    pub fn new(upload: Box<dyn MultipartUpload>, part_size: usize, concurrency: usize) -> Self {
        Self {
            upload,
            buffer: PutPayloadMut::new(),
            part_size: part_size.max(1),
            concurrency: concurrency.max(1),
            tasks: JoinSet::new(),
            parts: 0,
        }
    }

    /// Adds bytes, starting part uploads as parts fill. Call
    /// [`PartUploader::wait_for_capacity`] after each call to bound memory.
    pub fn put(&mut self, mut bytes: Bytes) {
        while !bytes.is_empty() {
            let room = self.part_size - self.buffer.content_length();
            if bytes.len() < room {
                self.buffer.push(bytes);
                return;
            }
            self.buffer.push(bytes.split_to(room));
            self.send_part();
        }
    }

    fn send_part(&mut self) {
        let payload: PutPayload = std::mem::take(&mut self.buffer).freeze();
        self.tasks.spawn(self.upload.put_part(payload));
        self.parts += 1;
    }

    /// Waits until fewer than `concurrency` parts are in flight.
    pub async fn wait_for_capacity(&mut self) -> object_store::Result<()> {
        while self.tasks.len() >= self.concurrency {
            self.join_one().await?;
        }
        Ok(())
    }

    async fn join_one(&mut self) -> object_store::Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(object_store::Error::Generic {
                store: "upload",
                source: Box::new(e),
            }),
            None => Ok(()),
        }
    }

    /// Sends the last part, waits for all parts and completes the upload;
    /// on any failure aborts it before returning the error.
    pub async fn finish(mut self) -> object_store::Result<PutResult> {
        if self.buffer.content_length() > 0 || self.parts == 0 {
            self.send_part();
        }
        let mut result = Ok(());
        while !self.tasks.is_empty() {
            if let Err(e) = self.join_one().await {
                result = Err(e);
                break;
            }
        }
        let completed = match result {
            Ok(()) => self.upload.complete().await,
            Err(e) => Err(e),
        };
        match completed {
            Ok(r) => Ok(r),
            Err(e) => {
                self.abort_inner().await;
                Err(e)
            }
        }
    }

    /// Stops in-flight parts and aborts the upload, so no parts are left
    /// behind in the store.
    pub async fn abort(mut self) {
        self.abort_inner().await;
    }

    async fn abort_inner(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        if let Err(e) = self.upload.abort().await {
            // Retention's garbage collection removes what is left; an S3
            // lifecycle rule (AbortIncompleteMultipartUpload) is the backstop.
            tracing::warn!(error = %e, "aborting the multipart upload failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;
    use object_store::path::Path;

    use super::*;

    #[tokio::test]
    async fn parts_reassemble_in_order() {
        let store = Arc::new(InMemory::new());
        let path = Path::from("a/b");
        let upload = store.put_multipart(&path).await.unwrap();
        let mut up = PartUploader::new(upload, 10, 2);
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for piece in data.chunks(37) {
            up.put(Bytes::copy_from_slice(piece));
            up.wait_for_capacity().await.unwrap();
        }
        up.finish().await.unwrap();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], &data[..]);
    }

    #[tokio::test]
    async fn an_empty_upload_completes_as_an_empty_object() {
        let store = Arc::new(InMemory::new());
        let path = Path::from("empty");
        let up = PartUploader::new(store.put_multipart(&path).await.unwrap(), 10, 2);
        up.finish().await.unwrap();
        assert_eq!(store.head(&path).await.unwrap().size, 0);
    }
}
