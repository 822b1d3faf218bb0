"""Turn the official polyp archives (or their extracted folders) into the layout polypsam reads.

    python -m polypsam.curation.prepare SRC [SRC ...] --out ROOT [--download] [--force] [--url KEY=URL]

Where things go:

    ROOT/TrainDataset/{images,masks}              PraNet's training split (900 Kvasir + 550 ClinicDB)
    ROOT/TestDataset/<name>/{images,masks}        PraNet's five test sets, used for the paper tables
    ROOT/Sources/<name>/{images,masks}            a full standalone dataset (Kvasir-SEG, CVC-ClinicDB,
                                                  ...) as published, for the cross-dataset splits
    ROOT/Sources/Kvasir-SEG/boxes.json            stem -> [[x0, y0, x1, y1], ...] from kavsir_bboxes.json
    ROOT/MANIFEST.sha256.csv                      path, sha256, bytes, width, height of every file
    ROOT/prepare_report.json                      counts, thresholded pixels, box checks, warnings
    ROOT/downloads/                               archives fetched by --download

PraNet's zips fill TrainDataset/TestDataset; standalone archives go to Sources/ and never into
TestDataset, because PraNet's test copies are the ones every published number was measured on.

Each SRC is a .zip or a folder (a folder may also hold several archives). What it is comes from
what it contains (folder pairs like images/+masks/, Original/+Ground Truth/, ETIS's p<N> mask names,
Kvasir-SEG's box file and file names, the image size), with folder names only as a fallback.

Why these formats: JPEG images are copied byte for byte (re-encoding would add a second loss);
TIFF/BMP images become PNG (lossless); PNG images are copied. Masks are always 8-bit PNG 0/255,
thresholded at > 127; Kvasir-SEG's masks are JPEGs whose artefacts this threshold decides, and the
number of pixels it had to decide is reported per set. A set whose masks are all empty, or a mask whose polyp
is below the threshold (values 2..127, e.g. 0/100), stops the run with one line naming the set and the file;
the first is checked for every set before anything is written.

Runs are idempotent: a file whose bytes would not change is not rewritten (so its mtime stays);
``--force`` rewrites everything. Sources are only read.

Modules: ``sources`` (zips and folders as file lists), ``detect`` (which dataset is where), ``write``
(one set to disk), ``boxes`` (Kvasir-SEG's box check), ``report`` (checks, manifest, report), ``fetch``
(``--download``), ``run`` (:func:`prepare`), ``cli`` (:func:`main`).
"""

from polypsam.curation.prepare.cli import main
from polypsam.curation.prepare.run import PrepareResult, prepare

__all__ = ["PrepareResult", "main", "prepare"]
