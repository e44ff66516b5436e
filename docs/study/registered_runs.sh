#!/usr/bin/env bash
# The runs registered in docs/study/PREDICTIONS.md, in order. Every `mls study` call is resumable: run this script
# again (from the same folder) and finished cells are skipped, an interrupted one goes on from its checkpoint.
# Run it from a folder holding datasets/photos (python benchmarks/real_photos.py --out datasets/photos). The fair pair's
# results.json is seeded with stored cells of the same settings, which are then not run again: at 8 epochs with
# docs/study/health/results.json, at 32 epochs with docs/study/finalists/results.json (their MoCo-v2 cells).
set -u
C=${MLS_CONFIGS:-$(dirname "$0")/../../configs}
mkdir -p logs
seed() { [ -f "$1/results.json" ] || { mkdir -p "$1" && cp "$(dirname "$0")/$2/results.json" "$1/results.json"; }; }
seed fair_pair health
seed fair_pair_long finalists
run() { name=$1; shift; echo "=== $name $(date -u +%FT%TZ)" >> queue.log; mls study "$@" > "logs/$name.log" 2>&1; echo "=== $name rc=$? $(date -u +%FT%TZ)" >> queue.log; }
# entry 1: the watch out of sample
run watch_scenes_32px --grid watch --seeds 1 --budget "$C/watch/scenes_32px.yaml" --out watch/scenes_32px
run watch_photos --grid watch --seeds 1 --budget "$C/watch/photos.yaml" --data datasets/photos/pretrain --out watch/photos
# entry 2: the fair pair at 8 epochs (validation)
run fair_pair --grid "$C/fair_pair.yaml" --seeds 3 --budget demo --base demo-0.4 --only '[recommended_paper_m_dz]' --out fair_pair
run watch_scenes_batch32 --grid watch --seeds 1 --budget "$C/watch/scenes_batch32.yaml" --out watch/scenes_batch32
run watch_scenes_queue64 --grid watch --seeds 1 --budget "$C/watch/scenes_queue64.yaml" --out watch/scenes_queue64
# entry 3: bunched keys, common push
run spread_start --grid "$C/spread_start.yaml" --seeds 3 --budget demo --base demo-0.4 --only '[spread_start]' --out spread_start
# entry 2: on the real photos' held-out part, then at 32 epochs (validation and, once, the test split)
run fair_pair_photos --grid "$C/fair_pair.yaml" --seeds 3 --budget "$C/fair_pair_photos.yaml" --data datasets/photos/pretrain --only '[recommended_paper_m_dz]' --out fair_pair_photos
python "$(dirname "$0")/watch/random_probe.py" datasets/photos/heldout 64 false > logs/random_probe_heldout.json  # its random reference
run fair_pair_long --grid "$C/fair_pair.yaml" --seeds 3 --budget long --base demo-0.4 --only '[recommended_paper_m_dz]' --test true --out fair_pair_long
# entry 4: the demo backbone's neighbours against a random network's, three pretraining seeds
for s in 0 1 2; do
  [ -f "demo_seeds/s$s/export/backbone.safetensors" ] && continue
  mls pretrain --seed $s --out "demo_seeds/s$s" $([ -d "demo_seeds/s$s/checkpoints" ] && echo --resume auto) --progress lines \
      > "logs/demo_seed$s.log" 2>&1
done
python "$(dirname "$0")/../../benchmarks/embed_neighbors.py" --seeds 0 1 2 \
    --weights demo_seeds/s0/checkpoints/last.ckpt demo_seeds/s1/checkpoints/last.ckpt demo_seeds/s2/checkpoints/last.ckpt \
    > logs/embed_neighbors.log 2>&1
# entry 5: the same measure on the real-photo set's held-out part (the photo fair pair's MoCo-v2 cell of seed 0, 309dd55c)
python "$(dirname "$0")/../../benchmarks/embed_neighbors.py" --seeds 0 \
    --weights fair_pair_photos/cells/mocov2-309dd55c/checkpoints/last.ckpt \
    --coco datasets/photos/heldout/coco/annotations/instances_train2017.json > logs/embed_neighbors_photos.log 2>&1
