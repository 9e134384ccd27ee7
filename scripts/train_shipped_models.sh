#!/usr/bin/env bash
# Retrain the two shipped models from scratch into weights/ (CPU is fine; a GPU is used when present).
#
#   scripts/train_shipped_models.sh DATA_DIR [ct|xray|both]
#
# DATA_DIR holds covid-ct/ (UCSD COVID-CT with Data-split/) and covid19-image-dataset-3class/ (train/<class>/).
# ImageNet MobileNetV2 weights must be reachable by torchvision: online, or offline as
# $TORCH_HOME/hub/checkpoints/mobilenet_v2-b0353104.pth.
# Models are built by cross-validation over train + val; the official test splits are never touched.
set -euo pipefail
DATA_DIR=${1:?usage: scripts/train_shipped_models.sh DATA_DIR [ct|xray|both]}
WHICH=${2:-both}
cd "$(dirname "$0")/.."
RUNS=${RUNS_DIR:-runs/shipped}
mkdir -p "$RUNS"

# CT: two 4-fold grouped cross-validations (train and val pooled; slices grouped by source and
# near-duplicate picture; the same folds) of a full MobileNetV2 fine-tune: backbone frozen for the first
# epoch, then trained at 1x (first run) or 0.1x (second run) the head's learning rate, one-cycle over 20
# epochs, strong augmentation, weight EMA (decay 0.9 per step), the weights of the last 8 epochs averaged
# (SWA over the schedule's tail), and the final epoch kept (no epoch chosen on a small val carve: out of
# fold that was worse). Each held-out fold is scored at 224-320 px. cv-join ships the 8 fold models of
# both runs as one ensemble: its card quotes their joined out-of-fold estimate with 95% intervals (each
# slice scored by the one fold model of each run that never saw it; oof.csv beside it), its inference
# size is the one with the best joined out-of-fold AUC (256 px won), and its input gate scores two
# mid-network blocks with its threshold from the out-of-fold images. 37 + 36 minutes for the runs and at
# most 15 for the join on a 2-core CPU.
# The card's repeated estimate (another fold partition; not run here, it doubles the time): rerun both
# cv commands with --repeats 2 into copies of their folders (the first partition's fold runs are
# reused), then: covidscan cv-repeats weights/ct-covid-mobilenet_v2 COPY-1.0 COPY-0.1
if [[ $WHICH == ct || $WHICH == both ]]; then
  for FACTOR in 1.0 0.1; do
    python3 -m covidscan cv --dataset covid-ct --root "$DATA_DIR/covid-ct" \
      --arch mobilenet_v2 --pretrained --image-size 224 --epochs 20 --batch-size 32 --lr 0.001 --backbone-lr-factor $FACTOR \
      --freeze-epochs 1 --augment strong --ema-decay 0.9 --average-last-epochs 8 --monitor last --seed 0 --modality CT \
      --name ct-covid-mobilenet_v2 \
      --folds 4 --inner-val-fraction 0.15 --bootstrap 1000 --eval-size 224 --eval-size 256 --eval-size 288 --eval-size 320 \
      --gate-tap features.8 --gate-tap features.13 --gate-combine mean --gate-taps-only --gate-pass-rate 0.95 \
      --out "$RUNS/ct-cv-backbone-lr-$FACTOR"
  done
  rm -rf weights/ct-covid-mobilenet_v2
  python3 -m covidscan cv-join "$RUNS/ct-cv-backbone-lr-1.0" "$RUNS/ct-cv-backbone-lr-0.1" \
    --name ct-covid-mobilenet_v2 \
    --description "COVID vs NonCOVID on chest CT slices (COVID-CT), ImageNet MobileNetV2, fully fine-tuned; 8 cross-validation fold models of two runs (backbone at 1x and 0.1x the head's learning rate), logits averaged." \
    --out weights/ct-covid-mobilenet_v2
fi
# X-ray: two 4-fold grouped cross-validations (train and val pooled; images grouped by near-duplicate
# picture; the same folds, training seeds 0 and 100) of a full MobileNetV2 fine-tune: light augmentation
# (80-100% crops and flips), class-balanced loss, weight EMA 0.9 and the final epoch kept, as for CT.
# cv-join ships the 8 fold models of both runs as one ensemble, stored in float16 (36 MB, as the 4
# float32 fold models of one run were): each held-out fold is scored with its weights rounded to float16,
# so the card's out-of-fold estimate (each image scored by the one fold model of each run that never saw
# it; oof.csv beside it) is exactly the stored weights'. About 5 minutes per run on an idle 2-core CPU.
# The card's repeated estimate (three more fold partitions; 16 more minutes per run): rerun both cv
# commands with --repeats 4 into copies of their folders, then:
# covidscan cv-repeats weights/xray-3class-mobilenet_v2 COPY-0 COPY-100
if [[ $WHICH == xray || $WHICH == both ]]; then
  for SEED in 0 100; do
    python3 -m covidscan cv --dataset folder --root "$DATA_DIR/covid19-image-dataset-3class" \
      --arch mobilenet_v2 --pretrained --image-size 224 --epochs 10 --batch-size 32 --lr 0.001 \
      --backbone-lr-factor 0.3 --freeze-epochs 1 --augment light --balance loss --ema-decay 0.9 --monitor last --seed $SEED \
      --modality X-ray --name xray-3class-mobilenet_v2 \
      --folds 4 --bootstrap 1000 --weights-dtype float16 --out "$RUNS/xray-cv-seed-$SEED"
  done
  rm -rf weights/xray-3class-mobilenet_v2
  python3 -m covidscan cv-join "$RUNS/xray-cv-seed-0" "$RUNS/xray-cv-seed-100" \
    --name xray-3class-mobilenet_v2 \
    --description "COVID / Normal / Viral Pneumonia on chest X-rays (Kaggle 3-class), ImageNet MobileNetV2, fully fine-tuned; 8 cross-validation fold models of two runs (training seeds 0 and 100, the same folds), logits averaged." \
    --out weights/xray-3class-mobilenet_v2
fi
python3 -m covidscan models
