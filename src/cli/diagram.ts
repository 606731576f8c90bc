/**
 * `drover diagram worker|task|instance [--format mermaid|dot]`: prints a state
 * diagram drawn from the machine definitions (src/machines/diagram.ts).
 * The machines it knows are those the model checks know
 * (src/testing/machine-models.ts), so a new machine is drawn once it is checked.
 */
import { DIAGRAM_FORMATS, drawMachine, type DiagramFormat } from '../machines/diagram.js';
import { UsageError, type Command } from './command.js';
import { EXIT } from './exit-codes.js';

/** The command, writing to `write` (stdout by default); tests capture it. */
export function createDiagramCommand(write: (text: string) => void = (text) => void process.stdout.write(text)): Command {
  return {
    usage: 'drover diagram worker|task|instance [--format mermaid|dot]',
    summary: 'print the state diagram of the worker, task or instance machine',
    details: `Draws the diagram from the machine's own definition: nested states as composite
states (clusters in dot), transitions labelled by their event and guard. Events a
state ignores on purpose are not drawn; the Mermaid output lists them in comments.
docs/machines.md embeds the Mermaid diagrams and explains each state and event.

Options:
  -f, --format mermaid|dot    Mermaid stateDiagram-v2 (default), or Graphviz dot`,
    options: { format: { type: 'string', short: 'f' } },
    async run(values, positionals) {
      // Loaded here, not at start: the other commands need neither xstate nor the models.
      const { MACHINE_MODELS } = await import('../testing/machine-models.js');
      const names = MACHINE_MODELS.map((model) => model.name);
      const [name, ...rest] = positionals;
      if (name === undefined) throw new UsageError(`which machine? one of: ${names.join(', ')}`);
      if (rest.length > 0) throw new UsageError(`one machine at a time, not "${positionals.join(' ')}"`);
      const model = MACHINE_MODELS.find((candidate) => candidate.name === name);
      if (model === undefined) throw new UsageError(`there is no machine "${name}"; there are: ${names.join(', ')}`);
      const format = (values['format'] ?? 'mermaid') as string;
      if (!DIAGRAM_FORMATS.includes(format as DiagramFormat)) {
        throw new UsageError(`--format must be one of ${DIAGRAM_FORMATS.join(', ')}, not "${format}"`);
      }
      write(drawMachine(model.machine, format as DiagramFormat));
      return EXIT.OK;
    },
  };
}

export const diagramCommand: Command = createDiagramCommand();
