/**
 * Graph algorithms over the model checker's explored states: nodes are
 * indexes, `edges[i]` lists the edges leaving node i. Iterative, so a deep
 * graph cannot overflow the stack.
 */

export interface GraphEdge {
  readonly to: number;
}

/** Which nodes can reach a node marked in `goal` (goal nodes included). */
export function reachingTo(edges: readonly (readonly GraphEdge[])[], goal: readonly boolean[]): boolean[] {
  const incoming: number[][] = edges.map(() => []);
  edges.forEach((list, from) => list.forEach((edge) => incoming[edge.to]!.push(from)));
  const reaches = goal.map((g) => g);
  const stack = goal.flatMap((g, i) => (g ? [i] : []));
  while (stack.length > 0) {
    const node = stack.pop()!;
    for (const from of incoming[node]!) {
      if (reaches[from]) continue;
      reaches[from] = true;
      stack.push(from);
    }
  }
  return reaches;
}

/**
 * Which nodes lie on a cycle (a self-loop counts), none of its nodes
 * `excluded`. Tarjan's strongly connected components, iteratively.
 */
export function findCycles(edges: readonly (readonly GraphEdge[])[], excluded: readonly boolean[]): boolean[] {
  const n = edges.length;
  const index = new Array<number>(n).fill(-1);
  const low = new Array<number>(n).fill(0);
  const onStack = new Array<boolean>(n).fill(false);
  const inCycle = new Array<boolean>(n).fill(false);
  const stack: number[] = [];
  let counter = 0;
  const successors = (node: number) => edges[node]!.map((edge) => edge.to).filter((to) => !excluded[to]);
  for (let root = 0; root < n; root++) {
    if (index[root] !== -1 || excluded[root]) continue;
    // Each frame: a node and how many of its successors were visited.
    const frames: { node: number; next: number; succ: number[] }[] = [];
    const open = (node: number) => {
      index[node] = low[node] = counter++;
      stack.push(node);
      onStack[node] = true;
      frames.push({ node, next: 0, succ: successors(node) });
    };
    open(root);
    while (frames.length > 0) {
      const frame = frames.at(-1)!;
      if (frame.next < frame.succ.length) {
        const to = frame.succ[frame.next++]!;
        if (index[to] === -1) open(to);
        else if (onStack[to]) low[frame.node] = Math.min(low[frame.node]!, index[to]!);
        continue;
      }
      frames.pop();
      const parent = frames.at(-1);
      if (parent !== undefined) low[parent.node] = Math.min(low[parent.node]!, low[frame.node]!);
      if (low[frame.node] !== index[frame.node]) continue;
      const component: number[] = [];
      for (;;) {
        const member = stack.pop()!;
        onStack[member] = false;
        component.push(member);
        if (member === frame.node) break;
      }
      if (component.length > 1 || frame.succ.includes(frame.node)) for (const member of component) inCycle[member] = true;
    }
  }
  return inCycle;
}

/** The edges of a shortest way from `from` to a node where `goal` holds ([] when `from` is one, or none is reachable). */
export function shortestRoute<E extends GraphEdge>(edges: readonly (readonly E[])[], from: number, goal: (node: number) => boolean): E[] {
  if (goal(from)) return [];
  const via = new Map<number, { from: number; edge: E }>();
  const queue = [from];
  const seen = new Set([from]);
  for (let head = 0; head < queue.length; head++) {
    const node = queue[head]!;
    for (const edge of edges[node]!) {
      if (seen.has(edge.to)) continue;
      seen.add(edge.to);
      via.set(edge.to, { from: node, edge });
      if (goal(edge.to)) {
        const route: E[] = [];
        for (let at = edge.to; at !== from; at = via.get(at)!.from) route.push(via.get(at)!.edge);
        return route.reverse();
      }
      queue.push(edge.to);
    }
  }
  return [];
}

/** The edges of a shortest cycle from `node` back to itself (at least one edge; [] when there is none). */
export function shortestCycle<E extends GraphEdge>(edges: readonly (readonly E[])[], node: number): E[] {
  let best: E[] | undefined;
  for (const edge of edges[node]!) {
    const back = edge.to === node ? [] : shortestRoute(edges, edge.to, (i) => i === node);
    if (edge.to !== node && back.length === 0) continue;
    if (best === undefined || back.length + 1 < best.length) best = [edge, ...back];
  }
  return best ?? [];
}
