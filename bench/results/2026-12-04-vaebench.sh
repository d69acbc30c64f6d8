#!/bin/bash
# usage: vaebench.sh SIZE ROUNDS [--tiled]
size=$1; rounds=$2; tiled=$3
for r in $(seq 1 $rounds); do
  for side in sd21 diffusers; do
    if [ $(( r % 2 )) = 0 ]; then side=$([ $side = sd21 ] && echo diffusers || echo sd21); fi
    if [ $side = sd21 ]; then
      cmd="/work/main/target/release/sd21-bench vae-decode --model /work/sd21-512-random --width $size --height $size ${tiled:+--vae-tiling}"
    else
      cmd="/tmp/fx/bin/python /work/main/bench/diffusers_vae_decode.py --model /work/sd21-512-random --width $size --height $size ${tiled:+--tiled}"
    fi
    out=$(/usr/bin/time -v $cmd 2>/tmp/vt.err | tail -1)
    rss=$(grep "Maximum resident" /tmp/vt.err | awk '{print $NF}')
    echo "round $r $out peak_rss_kb $rss"
  done
done
