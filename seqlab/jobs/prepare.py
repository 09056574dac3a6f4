"""`seqlab prepare species|speech`: build data sets and their manifests from local files.

    seqlab prepare species --out data/bacteria --debian          # Debian's ragout-examples
    seqlab prepare species --out data/mine --species "E. coli" a.fa b.fa c.fa \\
                                           --species "B. subtilis" d.fa e.fa f.fa
    seqlab prepare speech --out data/sc09like                     # asterisk sounds + espeak-ng

Both write into a temporary folder beside --out and rename it at the end, so a failed run
leaves nothing under --out; an existing data set in --out is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError, MissingInput


def _species_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqlab prepare species",
        description="Copy a slice of each strain's FASTA into a bgzipped, indexed data set and "
                    "write a manifest that holds out whole strains for test (and validation). "
                    "The last files given for a species are the held-out strains.")
    p.add_argument("--out", required=True, help="output folder (manifest.yaml is written there)")
    p.add_argument("--species", nargs="+", action="append", metavar=("NAME", "FASTA"),
                   help="a species name followed by its strain FASTA files (plain or .gz); "
                        "repeat for each species")
    p.add_argument("--debian", action="store_true",
                   help="use the 4 species of Debian's ragout-examples package "
                        "(apt-get install ragout-examples)")
    p.add_argument("--bases-per-strain", type=int, default=450_000,
                   help="bases copied from each strain, all of it when shorter "
                        "(default: %(default)s)")
    p.add_argument("--test-strains", type=int, default=1, help="held-out strains per species")
    p.add_argument("--val-strains", type=int, default=1,
                   help="validation strains per species where enough strains exist, else a "
                        "region split of the training strains")
    p.add_argument("--name", default="species", help="data set name written in the manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the data set already in --out (a folder with a manifest.yaml)")
    return p


def _speech_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqlab prepare speech",
        description="Build an SC09-like spoken-digit set (1 s clips, one folder per digit word, "
                    "speaker-level splits) from Asterisk voice prompts and espeak-ng voices.")
    p.add_argument("--out", required=True, help="output folder (manifest.csv is written there)")
    p.add_argument("--source", action="append", default=None,
                   help="Asterisk sounds root, a voice folder or a manifest (repeatable); "
                        "default: /usr/share/asterisk/sounds if installed, else the bundled speech")
    p.add_argument("--rate", type=int, default=16000, help="sample rate in Hz (default 16000)")
    p.add_argument("--espeak-voice", action="append", default=None,
                   help="espeak-ng voice to synthesise digits with (repeatable); "
                        "--no-espeak turns synthesis off")
    p.add_argument("--no-espeak", action="store_true", help="no synthesised voices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the data set already in --out (a folder with a manifest.csv)")
    return p


def main(what: str, argv: list[str]) -> None:
    if what == "species":
        args = _species_parser().parse_args(argv)
        from ..data.prepare import (RAGOUT_LICENCE, RAGOUT_NOTE, debian_sources,
                                    prepare_species)
        if args.debian == bool(args.species):
            raise ConfigError("seqlab prepare species: give either --debian or one or more "
                              "--species NAME FASTA...")
        if args.debian:
            sources = debian_sources()
            if not sources:
                raise MissingInput("seqlab prepare species: Debian's ragout-examples is not "
                                   "installed (apt-get install ragout-examples)")
            licence, note = RAGOUT_LICENCE, RAGOUT_NOTE
        else:
            sources = {}
            for group in args.species:
                if len(group) < 2:
                    raise ConfigError(f"seqlab prepare species: --species {group[0]!r} lists no "
                                      "FASTA files")
                sources[group[0]] = [Path(p) for p in group[1:]]
            licence, note = "see the source files' licences", "user-supplied FASTA files"
        manifest = prepare_species(sources, args.out, args.bases_per_strain,
                                   test_strains_per_species=args.test_strains,
                                   val_strains_per_species=args.val_strains, dataset=args.name,
                                   licence=licence, source_note=note, overwrite=args.overwrite)
        print(f"wrote {manifest}\ntrain on it with: seqlab run finetune_species "
              f"data.manifest={manifest}")
    elif what == "speech":
        args = _speech_parser().parse_args(argv)
        from ..data.audio import prepare_speech
        from ..data.prepare import check_output_folder
        from ..utils import atomic_directory
        out = check_output_folder(args.out, "manifest.csv", args.overwrite)
        voices = [] if args.no_espeak else args.espeak_voice
        # prepare_speech writes clips and a manifest of paths relative to its folder, so the
        # whole folder can be built under a temporary name and renamed when complete.
        with atomic_directory(out) as tmp:
            built = prepare_speech(tmp, sources=args.source, rate=args.rate,
                                   espeak_voices=voices, seed=args.seed)
        manifest = out / built.relative_to(tmp)
        print(f"wrote {manifest}\ntrain on it with: seqlab run train_audio data.source={manifest}")
    else:
        raise ConfigError(f"seqlab prepare: unknown data set kind {what!r} (species | speech)")
