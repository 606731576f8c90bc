/**
 * Preloaded (`node --import ./bench/cpu-usage.mjs ...`) into a process whose
 * own CPU time a benchmark reports: at exit it writes process.cpuUsage()
 * (microseconds of user and system time of this process alone, not its
 * children) as JSON to the file named by DROVER_BENCH_CPU_FILE. Unlike
 * wall time, this hardly moves with the machine's load.
 */
import { writeFileSync } from 'node:fs';

const file = process.env.DROVER_BENCH_CPU_FILE;
if (file) process.once('exit', () => writeFileSync(file, JSON.stringify(process.cpuUsage())));
