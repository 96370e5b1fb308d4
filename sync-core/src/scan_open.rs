//! Opening a scanned file again to read it.

use crate::Error;
use std::fs;
use std::io;
use std::path::Path;

/// Opens a regular file for reading without following a final symlink and
/// without blocking on a fifo swapped in since the scan.
pub fn open_regular(path: &Path) -> Result<fs::File, Error> {
    open_regular_stat(path).map(|(f, _)| f)
}

/// [`open_regular`], with what `fstat` said of the file opened.
///
/// # Errors
/// As [`open_regular`].
pub fn open_regular_stat(path: &Path) -> Result<(fs::File, fs::Metadata), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("open", path.display(), e))?;
    let st = f
        .metadata()
        .map_err(|e| Error::io("stat", path.display(), e))?;
    if !st.is_file() {
        return Err(Error::io(
            "open",
            path.display(),
            io::Error::from_raw_os_error(libc::ENOENT),
        ));
    }
    Ok((f, st))
}
