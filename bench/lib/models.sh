# Random checkpoints for the GPU scripts (sourced by bench/gpu_suite.sh and bench/gpu_serve.sh).

# spc_model PRESET: a random checkpoint of PRESET in /tmp/PRESET and the retrieval head pruned from a random
# EAGLE-3 draft for it in /tmp/PRESET-head, once per machine. The draft is trained at 2K (SpecForge layout);
# YaRN stretches it to the target's context, as the paper does with published drafts.
spc_model() {
  local p=$1
  if [ ! -e /tmp/$p/config.json ]; then
    specontext-random-checkpoint --preset $p --out /tmp/$p > /dev/null 2>&1 || echo "random checkpoint $p failed"
  fi
  if [ ! -e /tmp/$p-head/config.json ]; then
    specontext-random-checkpoint --eagle3_for $p --out /tmp/$p-eagle3 > /dev/null 2>&1 || echo "eagle3 draft $p failed"
    specontext prune --source /tmp/$p-eagle3 --kind eagle3 --target /tmp/$p --out /tmp/$p-head --yarn-factor auto \
      2>&1 | tail -2
  fi
}
