#!/usr/bin/env bash
# The converged runs behind the README's Results, run as "lanes" (each lane trains its models one
# after another; every run is resumable), and their state carried between machines in the repository.
#
#   bash results/lanes.sh restore   # the records' package versions; records and carried runs into $WORK/saved, $WORK/small
#   bash results/lanes.sh start     # start the lanes in the background (logs: $WORK/logs/<lane>-<model>.log)
#   bash results/lanes.sh start A   # start lane A only (one whose queue was ended or changed)
#   bash results/lanes.sh pack      # carry the runs in training into results/in_training/*.tar (then commit)
#   bash results/lanes.sh report    # copy new records into results/, make both reports, splice them into README.md
#   bash results/lanes.sh reproductions  # copy new records and per-user results; results/reproductions.md: re-runs against earlier records
#   bash results/lanes.sh stop      # end the lanes (their queues first, then the runs: each resumes later)
#   bash results/lanes.sh stop B L  # end lanes B and L only
#   bash results/lanes.sh status    # what each lane is running, its last progress line
#   bash results/lanes.sh focus "B A" "stage \[cf\] done"  # lanes other than B and A wait until B's log says so
#
# Each lane runs from its own git worktree of the current commit, so editing the checkout does not
# change the code of a run under way. The lanes share the project's two cores (each run is slower,
# the work done in a session about the same); the queues are balanced by their estimated CPU time
# (TTDS's two runs, the longest, start a lane each), so that no single run is left alone on one core
# at the end while the other core idles. A run that
# finishes leaves its record in $WORK/saved/runs: copy it to results/<report>/runs/ and make the
# report (README, "Converged").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/work/results}"
PY="${PY:-$ROOT/.venv/bin/python}"
CONFIGS="properties/ml-100k.yaml properties/converge.yaml"

# lane name | extra arguments ("small": the small-catalogue check, benchmarks/small_catalogue.py, with
# MODEL:USER_SEED, the draw of 201 users) | models (MODEL@warm_cold: the warm/cold protocol; MODEL#SEEDS:
# one run per seed, e.g. LightGCN#2020,2021,2022). A model
# that has its record is reused in seconds (--reuse_runs: its record is kept as it is), so a lane may list
# what is done already.
LOO_MODELS="SASRec,BERT4Rec,LightGCN,LightGCN[stopping_step=20],TIGER,LETTER,SETRec,SETRec[llm_preset=qwen2-tiny],TokenRec,TokenRec[tokenrec_loss=softmax],TwoLevelLLMRec,TTDS"
WARM_COLD_MODELS="SASRec,BERT4Rec,LightGCN,TwoLevelLLMRec,SETRec,SETRec[llm_preset=qwen2-tiny],TokenRec,TIGER,LETTER,TTDS"

LANES=(
  "A||LightGCN#2020,2021,2022 LightGCN[stopping_step=20]#2020,2021,2022 SASRec TwoLevelLLMRec#2020,2021,2022 LightGCN@warm_cold#2020,2021,2022 SASRec@warm_cold TwoLevelLLMRec@warm_cold TokenRec@warm_cold"
  "B||TIGER SETRec SETRec@warm_cold SETRec[llm_preset=qwen2-tiny]@warm_cold"
  "L||LETTER LETTER@warm_cold"
  "T||TTDS TIGER@warm_cold"
  "W||TTDS@warm_cold BERT4Rec@warm_cold"
  "S||BERT4Rec TokenRec TokenRec[tokenrec_loss=softmax] SETRec[llm_preset=qwen2-tiny]"
)

lane() {  # lane NAME EXTRA MODEL...: one model after another, in the worktree $WORK/tree-NAME
  local name=$1 extra=$2; shift 2
  cd "$WORK/tree-$name"
  # the runs outlive the shell that started them: a hangup when it ends killed a resumed run (rc 129)
  trap '' HUP
  for model in "$@"; do
    local rc=0
    local log="$WORK/logs/$name-${model//[^A-Za-z0-9_=.-]/_}.log"
    if [ "$extra" = small ]; then
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" benchmarks/small_catalogue.py --models "${model%:*}" \
        --user_seed "${model#*:}" --checkpoint_dir "$WORK/small" --out "$WORK/small/data" >> "$log" 2>&1 || rc=$?
    else
      local protocol="" seeds="" spec="$model"
      if [ "${spec%#*}" != "$spec" ]; then seeds="--seeds=${spec#*#}"; spec="${spec%#*}"; fi
      if [ "${spec%@warm_cold}" != "$spec" ]; then protocol="--protocol=warm_cold"; spec="${spec%@warm_cold}"; fi
      # shellcheck disable=SC2086
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" run_recbole_genrec.py --compare="$spec" \
        --dataset=ml-100k "--config_files=$CONFIGS" --checkpoint_dir="$WORK/saved" --show_progress=False \
        --resume=True --reuse_runs $extra $protocol $seeds >> "$log" 2>&1 || rc=$?
    fi
    # "failed(rc=N)": the run ended with an error (its log says which); the lane goes on with the next
    if [ "$rc" = 0 ]; then echo "$(date -Is) $model done"; else echo "$(date -Is) $model failed(rc=$rc)"; fi \
      >> "$WORK/logs/$name.done"
  done
}

lane_pids() {  # lane_pids NAME PATTERN: the processes matching PATTERN (pgrep -f) that work in the lane's worktree
  local pid
  for pid in $(pgrep -f "$2"); do
    [ "$(readlink "/proc/$pid/cwd" 2> /dev/null)" = "$WORK/tree-$1" ] && echo "$pid"
  done
  true
}

per_user() {  # each finished run's per-user (warm/cold: per-target) test metrics (paired SE in the report),
  # while its checkpoint is here: finished runs' checkpoints are not carried to the next machine
  OMP_NUM_THREADS=1 "$PY" -m recbole_genrec.evaluation.per_user "$WORK/saved/runs" "$ROOT/results/ml-100k/per_user" \
    2>&1 | grep -E "^(wrote|skipped)" || true
  OMP_NUM_THREADS=1 "$PY" -m recbole_genrec.evaluation.per_user "$WORK/saved/runs" \
    "$ROOT/results/ml-100k-warm_cold/per_user" --protocol=warm_cold 2>&1 | grep -E "^(wrote|skipped)" || true
}

cp_records() {  # new records of $WORK/saved/runs into results/<report>/runs (existing ones are kept)
  for record in "$WORK"/saved/runs/*.json; do
    case "$(basename "$record")" in
      *-warm_cold-*) cp -n "$record" "$ROOT/results/ml-100k-warm_cold/runs/" ;;
      *) cp -n "$record" "$ROOT/results/ml-100k/runs/" ;;
    esac
  done
}

reproductions() {  # every run with records of other code: its newest record against the earlier ones
  { echo "# Re-runs against earlier records"
    echo
    echo "Each run (model spec, dataset, protocol, seed) with records made by other code: its newest record"
    echo "against each earlier one (\`bash results/lanes.sh reproductions\`, $(date -u +%Y-%m-%d))."
    echo
    "$PY" -m recbole_genrec.evaluation.records "$ROOT/results/ml-100k/runs" "$ROOT/results/ml-100k-warm_cold/runs"
  } > "$ROOT/results/reproductions.md"
  cat "$ROOT/results/reproductions.md"
}

case "${1:-}" in
  restore)
    # the package versions of the records (part of every run's fingerprint; torch is installed as the README says)
    mkdir -p "$WORK/saved/runs" "$WORK/small/runs" "$WORK/logs"
    grep -v '^torch' "$ROOT/results/ml-100k/constraints.txt" > "$WORK/constraints.txt"
    "$PY" -m pip install -q -c "$WORK/constraints.txt" transformers peft numpy pandas scipy faiss-cpu
    cp -n "$ROOT"/results/ml-100k/runs/*.json "$ROOT"/results/ml-100k-warm_cold/runs/*.json "$WORK/saved/runs/"
    for pair in "ml-100k.tar saved" "small-catalogue.tar small"; do
      read -r archive dir <<< "$pair"
      if [ -f "$ROOT/results/in_training/$archive" ]; then
        "$PY" -m recbole_genrec.evaluation.carry unpack "$ROOT/results/in_training/$archive" "$WORK/$dir"
      fi
    done
    cp -n "$ROOT"/results/small-catalogue/runs/*.json "$WORK/small/runs/" 2> /dev/null || true
    true ;;
  start)
    shift
    mkdir -p "$WORK/logs"
    for spec in "${LANES[@]}"; do
      IFS='|' read -r name extra models <<< "$spec"
      if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
      pids=$(lane_pids "$name" "run_recbole_genrec.py|small_catalogue.py|results/lanes.sh start")
      if [ -n "$pids" ]; then
        echo "lane $name is running (processes $(echo $pids)): not starting it twice"; exit 1
      fi
      git -C "$ROOT" worktree remove --force "$WORK/tree-$name" 2> /dev/null || true
      git -C "$ROOT" worktree add -f --detach "$WORK/tree-$name" HEAD > /dev/null
      # shellcheck disable=SC2086
      (lane "$name" "$extra" $models &) > /dev/null 2>&1
      echo "lane $name: $models"
    done ;;
  pack)
    mkdir -p "$ROOT/results/in_training"
    "$PY" -m recbole_genrec.evaluation.carry pack "$WORK/saved" "$ROOT/results/in_training/ml-100k.tar"
    if [ -d "$WORK/small" ]; then
      "$PY" -m recbole_genrec.evaluation.carry pack "$WORK/small" "$ROOT/results/in_training/small-catalogue.tar"
      mkdir -p "$ROOT/results/small-catalogue/runs"
      cp "$WORK"/small/runs/*.json "$ROOT/results/small-catalogue/runs/" 2> /dev/null || true
    fi ;;
  report)
    # the README's records-only commands ("Converged"): they train nothing and read $WORK/saved/runs
    cp_records
    per_user
    cd "$ROOT"
    OMP_NUM_THREADS=1 "$PY" run_recbole_genrec.py --compare="$LOO_MODELS" --seeds=2020,2021,2022 --dataset=ml-100k \
      "--config_files=$CONFIGS" --checkpoint_dir="$WORK/saved" --records_only --report=results/ml-100k
    "$PY" -m recbole_genrec.evaluation.report README.md results/ml-100k/report.md ml-100k
    # no warm/cold record at this code yet: the command says so, and the README's section is left as it is
    if OMP_NUM_THREADS=1 "$PY" run_recbole_genrec.py --protocol=warm_cold --compare="$WARM_COLD_MODELS" --seeds=2020,2021,2022 \
      --dataset=ml-100k "--config_files=$CONFIGS" --checkpoint_dir="$WORK/saved" --records_only --report=results/ml-100k-warm_cold; then
      "$PY" -m recbole_genrec.evaluation.report README.md results/ml-100k-warm_cold/report.md ml-100k-warm_cold
    else
      echo "warm/cold: no report (above); the README's warm/cold section was not replaced"
    fi
    reproductions
    echo "look at every PNG under results/ml-100k and results/ml-100k-warm_cold, then update the README's bullets" ;;
  focus)
    # A stage that cannot resume mid-way (a CF model, a tokenizer) starts again from nothing when the
    # lanes end with the working session: SETRec's CF stage, at a third of a core beside five other
    # runs, started four times without finishing. So let two lanes have the two cores (each run uses
    # one thread): pause the runs of the others (nothing is lost: they wait) until the first lane's
    # newest log has a line matching the pattern, then resume them. In the background; its lines go
    # to $WORK/logs/focus.log.
    keep=" $2 " pattern=$3
    read -r first _ <<< "$2"
    log=$(ls -t "$WORK"/logs/"$first"-*.log | head -1)
    others=()
    for spec in "${LANES[@]}"; do [[ "$keep" == *" ${spec%%|*} "* ]] || others+=("${spec%%|*}"); done
    (
      from=$(wc -l < "$log")
      others_pids() { for other in "${others[@]}"; do lane_pids "$other" "run_recbole_genrec.py|small_catalogue.py"; done; }
      echo "$(date -Is) lanes ${others[*]} wait until $log says /$pattern/"
      until tail -n +"$((from + 1))" "$log" | grep -q -- "$pattern"; do
        others_pids | xargs -r kill -STOP  # again each time: a lane that ended a run starts its next one
        sleep 30
      done
      others_pids | xargs -r kill -CONT
      echo "$(date -Is) lanes ${others[*]} resumed: $(tail -n +"$((from + 1))" "$log" | grep -- "$pattern" | head -1 | cut -c1-120)"
    ) >> "$WORK/logs/focus.log" 2>&1 &
    echo "lanes$keep have the cores; the others resume when $log says /$pattern/ ($WORK/logs/focus.log)" ;;
  status)  # each lane's run now and the last line of its progress
    for spec in "${LANES[@]}"; do
      IFS='|' read -r name extra models <<< "$spec"
      running=""
      for pid in $(lane_pids "$name" "run_recbole_genrec.py|small_catalogue.py"); do
        running=$(tr '\0' ' ' < "/proc/$pid/cmdline" | grep -o -- '--compare=[^ ]*\|--models [^ ]*' | head -1)
        [ "$(awk '{print $3}' "/proc/$pid/stat")" = T ] && running="$running (paused)"
      done
      # each model once, with the outcome of its last attempt
      ended=$(awk '{ if (!($2 in state)) order[++n] = $2; state[$2] = $3 }
        END { for (i = 1; i <= n; i++) printf "%s%s ", order[i], (state[order[i]] == "done" ? "" : " (" state[order[i]] ")") }' \
        "$WORK/logs/$name.done" 2> /dev/null || true)
      echo "lane $name: ${running:-nothing running}; ended: $ended"
      log=$(ls -t "$WORK"/logs/"$name"-*.log 2> /dev/null | head -1)
      [ -n "$log" ] && grep -E "progress:|stage \[" "$log" | tail -1 | cut -c1-160 | sed 's/^/  /' || true
    done
    true ;;
  reproductions)  # each re-run (other code) against its earlier records: results/reproductions.md
    cp_records
    per_user
    reproductions ;;
  stop)
    # the lanes' shells first: killing only a run would start the next model of its queue
    shift
    if [ $# -eq 0 ]; then
      pkill -f "results/lanes.sh (start|focus)" || true
      pkill -f "run_recbole_genrec.py|small_catalogue.py" || true
      pkill -CONT -f "run_recbole_genrec.py|small_catalogue.py" || true  # a paused run ends only once resumed
    else  # stop B L: the lanes whose processes work in $WORK/tree-B, $WORK/tree-L
      for pattern in "results/lanes.sh start" "run_recbole_genrec.py|small_catalogue.py"; do
        for name in "$@"; do
          # shellcheck disable=SC2046
          kill $(lane_pids "$name" "$pattern") 2> /dev/null || true
          kill -CONT $(lane_pids "$name" "$pattern") 2> /dev/null || true
        done
      done
    fi
    true ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
