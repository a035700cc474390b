#!/usr/bin/env bash
# Checks generated tokenizer.json files with Hugging Face's own (Rust) `tokenizers`, through its
# prebuilt Node binding from the npm registry: each file must load, have the expected size and
# round-trip a sentence.   tools/random_checkpoint/verify_hf_tokenizer.sh DIR/tokenizer.json...
set -euo pipefail
(($# > 0)) || { echo "usage: $0 tokenizer.json..." >&2; exit 2; }
work="${SPC_NPM_DIR:-${TMPDIR:-/tmp}/spc-hf-tokenizers}"
mkdir -p "$work"
if [[ ! -d "$work/node_modules/@anush008/tokenizers" ]]; then
  (cd "$work" && npm install --no-audit --no-fund --silent @anush008/tokenizers@0.6.0 >/dev/null)
fi
NODE_PATH="$work/node_modules" node - "$@" <<'JS'
const { Tokenizer } = require('@anush008/tokenizers');
const text = "Once upon a time, the baker's bread was 1234 grams!";
(async () => {
  for (const path of process.argv.slice(2)) {
    const tok = Tokenizer.fromFile(path);
    const ids = (await tok.encode(text, null)).getIds();
    const back = await tok.decode(ids, true);
    if (back !== text) throw new Error(`${path}: decode(encode(x)) = ${JSON.stringify(back)}`);
    console.log(`${path}: ok, ${tok.getVocabSize(true)} ids, ${ids.length} tokens for the sample`);
  }
})().catch((e) => { console.error(String(e)); process.exit(1); });
JS
