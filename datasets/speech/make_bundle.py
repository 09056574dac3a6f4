"""Rebuild the bundled speech subset from the Debian asterisk-core-sounds-*-wav packages.

    apt-get download asterisk-core-sounds-{en,es,fr,it,ru}-wav asterisk-core-sounds-{en,es,fr,it,ru}
    for f in asterisk-core-sounds-*.deb; do dpkg-deb -x $f root; done
    python datasets/speech/make_bundle.py root

The 8 kHz 16-bit mono WAVs are stored losslessly as 16-bit FLAC at their native rate (the
dataset resamples on load); transcripts come from the packages' core-sounds-<lang>.txt.
Speaker folders are named by voice, so the two Allison Smith folders (en_US, es_MX) share one.
"""
import gzip
import sys
from pathlib import Path

import soundfile as sf
import yaml

HERE = Path(__file__).resolve().parent
VOICES = {  # package language -> (folder under sounds/, speaker id, split)
    "en": ("en_US_f_Allison", "allison", "train"),
    "es": ("es_MX_f_Allison", "allison", "train"),
    "it": ("it_IT_m_Carlo", "carlo", "train"),
    "ru": ("ru_RU_f_IvrvoiceRU", "ivrvoiceru", "valid"),
    "fr": ("fr_CA_f_June", "june", "test"),
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = [f"digits/{d}" for d in range(20)] + ["conf-onlyperson", "vm-intro", "auth-thankyou"]


def transcripts(root: Path, lang: str) -> dict:
    out = {}
    with gzip.open(root / f"usr/share/doc/asterisk-core-sounds-{lang}/core-sounds-{lang}.txt.gz", "rt") as fh:
        for line in fh:
            key, sep, text = line.partition(":")
            if sep and not line.startswith(";"):
                out.setdefault(key.strip(), text.strip())  # first wins: es lists digits/0 twice
    return out


def main(root: Path) -> None:
    items = []
    for lang, (folder, speaker, split) in VOICES.items():
        texts = transcripts(root, lang)
        for prompt in PROMPTS:
            src = root / "usr/share/asterisk/sounds" / folder / f"{prompt}.wav"
            data, rate = sf.read(src, dtype="int16")
            dest = HERE / speaker / f"{folder.rsplit('_', 2)[0]}-{prompt.replace('/', '-')}.flac"
            dest.parent.mkdir(exist_ok=True)
            sf.write(dest, data, rate, subtype="PCM_16", format="FLAC")
            d = prompt.removeprefix("digits/")
            label = DIGIT_WORDS[int(d)] if prompt.startswith("digits/") and int(d) < 10 else prompt
            items.append({"path": dest.relative_to(HERE).as_posix(), "speaker": speaker, "split": split,
                          "label": label, "text": texts.get(prompt, ""), "language": folder.rsplit("_", 2)[0],
                          "source": f"asterisk-core-sounds-{lang}-wav:/usr/share/asterisk/sounds/{folder}/{prompt}.wav"})
    header = ("# Bundled real speech: see README.md (manifest format) and ATTRIBUTION.md (licences).\n"
              "# Rebuilt by make_bundle.py; paths are relative to this file.\n")
    (HERE / "manifest.yaml").write_text(header + yaml.safe_dump({"rate": 8000, "items": items},
                                                                 sort_keys=False, allow_unicode=True, width=120))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
