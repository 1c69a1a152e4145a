"""The files under a folder that may be samples, links resolved across the whole source tree: every file once, under
the folder that really holds it; what is not an image skipped, what cannot be read or is reached twice rejected."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:  # the scan's record, which these functions fill in
    from pipeline.writer.layout import Source

# What counts as an image: torchvision ImageFolder's extensions, plus GIF and the photo formats a phone saves (HEIC,
# AVIF: listed as rejected where Pillow has no decoder for them, not skipped). Files without an extension are images
# if Pillow recognises their content. Anything else (.xmp, .json, .txt, Thumbs.db) and hidden files (.DS_Store,
# macOS's ._IMG_0001.jpg) are skipped: listed in the manifest apart from the rejected images, never a sample.
IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".heic",
    ".heif",
    ".avif",
}


def not_an_image(path: str) -> str | None:
    """Why a file is skipped as not an image, by the rule of IMAGE_EXTENSIONS; None for an image."""
    name = os.path.basename(path)
    if name.startswith("."):
        return "hidden file"
    ext = os.path.splitext(name)[1].lower()
    if ext:
        return None if ext in IMAGE_EXTENSIONS else f"not an image file ({ext})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(path).close()  # reads the header only
        return None
    except Exception:  # Pillow raises many types on content it does not recognise; all mean "not an image"
        return "no extension, and not an image by its content"


def is_dir(e: os.DirEntry) -> bool:
    """A folder, links followed; a link loop (ELOOP) is no folder: listing() rejects it with its reason."""
    try:
        return e.is_dir()
    except OSError:
        return False


def listing(src: Source, folder: str) -> tuple[list[tuple[str, os.stat_result, bool]], list[tuple[str, bool]]]:
    """The regular files and the (sorted) folders directly in `folder`, links followed, each with whether it is a
    link; anything else is rejected. Paths stay strings: ImageNet has 1.28M files, and a Path object each would double
    the time of the scan."""
    files, dirs = [], []
    with os.scandir(folder) as found:
        for e in found:
            try:
                if e.is_dir():
                    dirs.append((e.path, e.is_symlink()))
                elif e.is_file():
                    why = not_an_image(e.path)
                    if why:
                        src.skip(e.path, why)
                    else:
                        files.append((e.path, e.stat(), e.is_symlink()))
                else:  # a FIFO would block its reader forever; a dangling link has nothing to read
                    src.reject(e.path, "unreadable (broken symbolic link)" if e.is_symlink() else "not a regular file")
            except OSError as err:  # a link to itself (ELOOP) is one unreadable entry, not an unreadable folder
                src.reject(e.path, f"unreadable ({err.strerror})")
    return files, sorted(dirs)


def taken(src: Source, path: str, st: os.stat_result, link: bool, linked: bool) -> bool:
    """Whether a listed file is a sample here: a link into the tree is not (its target is one where it really is),
    nor a second path to a file out of the tree."""
    if link:
        target = os.path.realpath(path)
        if src.holder(os.path.dirname(target)) is not None:
            src.reject(path, f"link to {src.named(target)}, which is written as itself")
            return False
    if link or linked:
        first = src.linked.setdefault((st.st_dev, st.st_ino), path)
        if first != path:
            src.reject(path, f"the same file as {os.path.relpath(first, src.root)} (symbolic link)")
            return False
    return True


def elsewhere(src: Source, real: str, own: str, link: bool) -> str | None:
    """Why a folder whose real path is `real`, found in the folder `own`, is not walked there; None to walk it."""
    holder = src.holder(real)
    if holder is not None and holder != own:
        return f"leads into {holder}, another class's folder (symbolic link): its images are labelled there"
    if holder is not None and link:
        return "folder already included through another path (symbolic link)"
    if holder is None and any(o.startswith(os.path.join(real, "")) for o in src.owners):
        return f"leads to {src.named(real)}, which holds class folders (symbolic link): not part of a class"
    return None


def walk(src: Source, folder: str, own: str) -> list[tuple[str, os.stat_result]]:
    """Every regular file under `folder` (found as the folder `own`, relative to the root), at any depth, as
    torchvision's ImageFolder finds them; each folder and each file once across the whole tree."""
    real = os.path.realpath(folder)
    why = elsewhere(src, real, own, False)
    if why:
        src.reject(folder, why)
        return []
    files, todo = [], [(folder, real, False)]
    while todo:
        d, real, linked = todo.pop(0)
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in src.seen:
            src.reject(d, "folder already included through another path (symbolic link)")
            continue
        src.seen.add((st.st_dev, st.st_ino))
        found, subfolders = listing(src, d)
        files += [(p, st) for p, st, link in found if taken(src, p, st, link, linked)]
        for sub, link in subfolders:
            real_sub = os.path.realpath(sub) if link else os.path.join(real, os.path.basename(sub))
            why = elsewhere(src, real_sub, own, link)
            if why:
                src.reject(sub, why)
            else:
                todo.append((sub, real_sub, linked or link))
    return files


def reject_hidden(src: Source, folders: list[str]) -> None:
    """Hidden folders beside the class folders are not classes (.ipynb_checkpoints, .Trash); their files are listed.
    One inside a flat split folder is that folder's own; a link to a class folder is rejected, not walked."""
    for d in folders:
        own = None if os.path.islink(d) else src.holder(os.path.realpath(d))
        for p, _ in walk(src, d, own or os.path.relpath(d, src.root)):
            src.reject(p, "in a hidden folder, not a class folder")
