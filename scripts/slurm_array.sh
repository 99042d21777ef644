#!/usr/bin/env bash
# Submit one SLURM array task per participant, then the group level once all succeeded.
#
#   scripts/slurm_array.sh BIDS_DIR OUTPUT_DIR [bids-denoise options ...]
#
# Environment (all optional):
#   BIDS_DENOISE_CMD  how to run the app; default "bids-denoise". For the container:
#                     BIDS_DENOISE_CMD="apptainer run --nv --containall -B /data:/data -B /scratch:/scratch img.sif"
#   SBATCH_ARGS       resources of each participant task, default "-c 2 --mem=8G -t 04:00:00"
#                     (add "--gres=gpu:1" for GPU methods)
#   GROUP_SBATCH_ARGS resources of the group job, default "-c 1 --mem=2G -t 00:30:00"
#   WORK_ROOT         where per-participant work directories go; default "${TMPDIR:-/tmp}" on the node
#                     (local scratch: a work dir on a shared file system is slow and needs no backup)
#   PARTICIPANTS      space-separated labels; default every sub-* folder of BIDS_DIR
# Prints the array job id and the group job id.
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,16p' "$0"
    exit 64
fi
bids_dir=$(cd "$1" && pwd)
output_dir=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2
app=${BIDS_DENOISE_CMD:-bids-denoise}
participants=${PARTICIPANTS:-$(cd "$bids_dir" && ls -d sub-*/ 2>/dev/null | sed 's#sub-##; s#/##' | tr '\n' ' ')}
read -r -a labels <<<"$participants"
if [ ${#labels[@]} -eq 0 ]; then
    echo "no participants found in $bids_dir" >&2
    exit 66
fi
log_dir="$output_dir/logs/slurm"
mkdir -p "$log_dir"
extra=$(printf ' %q' "$@")
labels_q=$(printf ' %q' "${labels[@]}")
# the work root as the task script reads it: WORK_ROOT as given, else the node's own TMPDIR (expanded there)
# shellcheck disable=SC2016
work_root=${WORK_ROOT:-'${TMPDIR:-/tmp}'}

array_id=$(sbatch --parsable ${SBATCH_ARGS:--c 2 --mem=8G -t 04:00:00} \
    --job-name=bids-denoise --array=0-$((${#labels[@]} - 1)) \
    --output="$log_dir/participant_%A_%a.out" <<EOS
#!/usr/bin/env bash
set -euo pipefail
labels=($labels_q)
label=\${labels[\$SLURM_ARRAY_TASK_ID]}
work="$work_root/bids-denoise_\${SLURM_ARRAY_JOB_ID}_\${SLURM_ARRAY_TASK_ID}"
mkdir -p "\$work"
trap 'rm -rf "\$work"' EXIT
$app "$bids_dir" "$output_dir" participant --participant-label "\$label" -w "\$work" --nprocs "\${SLURM_CPUS_PER_TASK:-1}" $extra
EOS
)
group_id=$(sbatch --parsable ${GROUP_SBATCH_ARGS:--c 1 --mem=2G -t 00:30:00} --job-name=bids-denoise-group \
    --dependency=afterok:"$array_id" --output="$log_dir/group_%j.out" \
    --wrap="$app $(printf '%q' "$bids_dir") $(printf '%q' "$output_dir") group")
echo "participants: array job $array_id (${#labels[@]} tasks); group: job $group_id"
