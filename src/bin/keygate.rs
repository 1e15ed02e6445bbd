//! `keygate`: create API keys in the formats the filter reads, hash them, maintain key-set
//! files, and check filter configs offline with the filter's own parser.
//!
//! Exit status: 0 success, 1 a refused input (invalid config, key set or key), 2 a usage error.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    native::main()
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::fs::{self, OpenOptions};
    use std::io::{self, IsTerminal, Read, Write};
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;

    use clap::{Args, Parser, Subcommand, ValueEnum};

    use keygate::cli::boundary_lint::lint_text;
    use keygate::cli::config_check::{shared_namespace_warnings, Outcome};
    use keygate::cli::envoy_config_sources::check_file;
    use keygate::cli::keygen::{self, KeyFormat, Shape, PROFILES};
    use keygate::cli::keyset_file::{self, Revoke};
    use keygate::cli::random::OsRandom;
    use keygate::core::checksum::Checksum;
    use keygate::core::credential::MAX_TOKEN_LEN;
    use keygate::core::keyset::{Enabled, KeyRecordSpec};
    use keygate::core::limits::RateLimitSpec;

    #[derive(Parser)]
    #[command(
        name = "keygate",
        version,
        about = "Create API keys, hash them, maintain key sets, and check keygate configs offline",
        long_about = "Create API keys, hash them, maintain key sets, and check keygate configs \
                      offline.\n\nKey records and key-set files hold SHA-256 digests only; a \
                      secret is printed once, when it is created, and never stored by keygate."
    )]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Create and hash keys
        #[command(subcommand)]
        Key(KeyCommand),
        /// Maintain key-set files ({"keys": [...]}, the format the filter and key services use)
        #[command(subcommand)]
        Keyset(KeysetCommand),
        /// Check keygate configurations
        #[command(subcommand)]
        Config(ConfigCommand),
    }

    #[derive(Subcommand)]
    enum KeyCommand {
        /// Create a key from the OS random source: prints the key once (stderr) and its record (stdout)
        #[command(
            long_about = "Create a key from the OS random source.\n\n\
            The key itself is printed once, on stderr (or written to --secret-file); the key \
            record with its SHA-256 digest is printed as JSON on stdout, ready for \
            `keygate keyset add`.\n\n\
            Formats: opaque (`<prefix><random>`, digest of the whole key), id-secret \
            (`<id>:<base64url secret>`, digest of the secret), pair (an id and a secret sent in \
            two headers, digest of the secret). --checksum crc32 appends six base62 characters \
            that the filter verifies (`\"checksum\": \"crc32\"` on the credential source) before \
            any lookup.",
            after_help = "Examples:\n  \
            keygate key new --profile compresr --checksum crc32 --tenant acct-42 | keygate keyset add keys.json\n  \
            keygate key new --format id-secret --prefix abk_ --id abk_partner7 --user owner@company-7\n  \
            keygate key new --profile makepay --tenant team-3 --secret-file team-3.secret"
        )]
        New(Box<NewArgs>),
        /// Print the SHA-256 digest the filter compares, of a key read from stdin (never from arguments)
        #[command(
            long_about = "Print the SHA-256 digest the filter compares, of a key read \
            from standard input.\n\nThe key is read from stdin only, so it never lands in shell \
            history or the process list. One trailing newline is ignored.\n\n\
            opaque and pair: the digest of the whole text (for a pair, pipe the secret header's \
            value). id-secret: the digest of the part after the first ':'.",
            after_help = "Example:\n  printf %s \"$KEY\" | keygate key hash --checksum crc32"
        )]
        Hash(HashArgs),
    }

    #[derive(Clone, Copy, ValueEnum)]
    enum FormatArg {
        Opaque,
        IdSecret,
        Pair,
    }

    impl FormatArg {
        fn shape(self) -> Shape {
            match self {
                FormatArg::Opaque => Shape::Opaque,
                FormatArg::IdSecret => Shape::IdSecret,
                FormatArg::Pair => Shape::Pair,
            }
        }
    }

    #[derive(Clone, Copy, ValueEnum)]
    enum ChecksumArg {
        Crc32,
    }

    impl From<ChecksumArg> for Checksum {
        fn from(_: ChecksumArg) -> Checksum {
            Checksum::Crc32
        }
    }

    #[derive(Args)]
    struct NewArgs {
        /// Preset for a shipped API profile: format, prefixes, and the record's environment or product
        #[arg(long, value_parser = PROFILES.map(|p| p.name), conflicts_with_all = ["format", "prefix", "secret_prefix"])]
        profile: Option<String>,
        /// Key format
        #[arg(long, value_enum, default_value = "opaque")]
        format: FormatArg,
        /// Prefix of the key (opaque) or of the key id (id-secret, pair), e.g. cmp_, abk_, mk_makepay_
        #[arg(long, default_value = "")]
        prefix: String,
        /// Prefix of the secret (pair, id-secret), e.g. mksec_
        #[arg(long, default_value = "")]
        secret_prefix: String,
        /// Append a checksum the filter verifies before any lookup
        #[arg(long, value_enum)]
        checksum: Option<ChecksumArg>,
        /// Key id (default: random; id-secret and pair ids start with the prefix)
        #[arg(long)]
        id: Option<String>,
        /// Write the key to this new file (mode 0600) instead of printing it on stderr
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
        #[command(flatten)]
        fields: FieldArgs,
    }

    /// The flags for key record fields (see the README's key record table); `record` turns
    /// them into the record itself.
    #[derive(Args)]
    struct FieldArgs {
        /// Owner: partner, company, team or merchant
        #[arg(long)]
        tenant: Option<String>,
        /// An organization the key may see (repeatable)
        #[arg(long = "organization", value_name = "ORG")]
        organizations: Vec<String>,
        /// Environment, e.g. test or live
        #[arg(long)]
        environment: Option<String>,
        /// Product or app (MakePay appSlug)
        #[arg(long)]
        product: Option<String>,
        /// A permission name (repeatable)
        #[arg(long = "permission", value_name = "NAME")]
        permissions: Vec<String>,
        /// An allowed browser origin, e.g. https://merchant.example (repeatable)
        #[arg(long = "origin", value_name = "ORIGIN")]
        origins: Vec<String>,
        /// The user the key acts for
        #[arg(long)]
        user: Option<String>,
        /// Expiry (API_KEY_EXPIRED after it): RFC 3339 time or Unix seconds
        #[arg(long, value_name = "TIME")]
        expires_at: Option<String>,
        /// End of a rotation grace period (INVALID_API_KEY after it): RFC 3339 or Unix seconds
        #[arg(long, value_name = "TIME")]
        not_after: Option<String>,
        /// Create the record disabled ("enabled": false)
        #[arg(long)]
        disabled: bool,
        /// The key's own rate limit: REQUESTS per SECONDS, e.g. 600/60
        #[arg(long, value_name = "REQUESTS/SECONDS", value_parser = parse_rate)]
        rate_limit: Option<(u64, u64)>,
        /// Extra requests allowed at once above the rate limit
        #[arg(long, requires = "rate_limit", default_value_t = 0)]
        burst: u64,
        /// Budget units the key may spend per calendar month (UTC)
        #[arg(long, value_name = "UNITS")]
        monthly_budget: Option<u64>,
    }

    impl FieldArgs {
        /// The record these flags describe, without its id and digest (`new_key` sets them).
        fn record(self) -> KeyRecordSpec {
            KeyRecordSpec {
                tenant: self.tenant,
                organizations: self.organizations,
                environment: self.environment,
                product: self.product,
                permissions: self.permissions,
                origins: self.origins,
                user: self.user,
                expires_at: self.expires_at.as_deref().map(keygen::time_spec),
                not_after: self.not_after.as_deref().map(keygen::time_spec),
                enabled: Enabled(!self.disabled),
                rate_limit: self
                    .rate_limit
                    .map(|(requests, per_seconds)| RateLimitSpec {
                        requests,
                        per_seconds,
                        burst: self.burst,
                    }),
                monthly_budget: self.monthly_budget,
                ..KeyRecordSpec::default()
            }
        }
    }

    fn parse_rate(text: &str) -> Result<(u64, u64), String> {
        let (requests, seconds) = text
            .split_once('/')
            .ok_or("expected REQUESTS/SECONDS, e.g. 600/60")?;
        let number = |t: &str| t.parse::<u64>().map_err(|e| format!("'{t}': {e}"));
        Ok((number(requests)?, number(seconds)?))
    }

    #[derive(Args)]
    struct HashArgs {
        /// How the filter reads the key
        #[arg(long, value_enum, default_value = "opaque")]
        format: FormatArg,
        /// Refuse a key whose checksum does not match (a mistyped key)
        #[arg(long, value_enum)]
        checksum: Option<ChecksumArg>,
    }

    #[derive(Subcommand)]
    enum KeysetCommand {
        /// Write a new key-set document from key records (files, or stdin when none)
        #[command(
            after_help = "Records may be single objects (the output of `keygate key new`), \
            arrays, {\"keys\": [...]} documents, or several of these one after another.\n\n\
            Example:\n  (keygate key new --profile compresr; keygate key new --profile compresr) \
            2>secrets.txt | keygate keyset build -o keys.json"
        )]
        Build {
            /// Write here (atomically) instead of stdout
            #[arg(short, long, value_name = "FILE")]
            output: Option<PathBuf>,
            /// Files of key records
            records: Vec<PathBuf>,
        },
        /// Add key records (files, or stdin when none) to a key-set file, creating it if missing
        #[command(
            after_help = "The result is checked with the filter's own key-set parser \
            (unique ids and digests, valid fields) before the file is replaced.\n\n\
            Example:\n  keygate key new --profile abaco --user owner@company-7 | keygate keyset add keys.json"
        )]
        Add {
            /// The key-set file
            keyset: PathBuf,
            /// Files of key records
            records: Vec<PathBuf>,
        },
        /// Revoke keys by id: marks them "enabled": false (or removes them with --remove)
        Revoke {
            /// The key-set file
            keyset: PathBuf,
            /// Ids of the keys to revoke
            #[arg(required = true)]
            ids: Vec<String>,
            /// Remove the records instead of disabling them
            #[arg(long)]
            remove: bool,
        },
        /// Check key-set files with the filter's own parser
        Check {
            #[arg(required = true)]
            files: Vec<PathBuf>,
        },
    }

    #[derive(Subcommand)]
    enum ConfigCommand {
        /// Check keygate plugin configs (JSON) or every keygate filter in Envoy configs (YAML/JSON)
        #[command(
            long_about = "Check keygate configurations with the code the filter runs in \
            on_configure, printing each error with its path.\n\n\
            FILE is a plugin configuration (the JSON object with \"credentials\"), or an Envoy \
            config (YAML or JSON) in which every HTTP filter of type \
            envoy.extensions.filters.http.wasm.v3.Wasm whose root_id is \"keygate\" or whose code \
            file name contains \"keygate\" is checked; its configuration must be a \
            google.protobuf.StringValue holding the plugin JSON. Other wasm filters are skipped. \
            Exits 1 when any configuration would be refused.\n\n\
            It also lints the trust boundary around keygate and prints each problem as \
            `FILE: warning[RULE]: PATH: problem. Fix: ...`: path normalization and underscore \
            headers on every connection manager with a keygate filter, CORS credentials for \
            any origin, failure_policy, query-string credentials, and public routes that also \
            match protected paths. A file accepts a rule it chose deliberately with the comment \
            `# keygate config check: accept RULE`. With --strict, any other warning exits 1.",
            after_help = "Example:\n  keygate config check --strict envoy/*.yaml"
        )]
        Check {
            /// Exit 1 on any boundary warning the file does not accept
            #[arg(long)]
            strict: bool,
            #[arg(required = true)]
            files: Vec<PathBuf>,
        },
    }

    /// A refused input: printed as `keygate: <message>`, exit status 1.
    struct Refused(String);

    impl<T: Into<String>> From<T> for Refused {
        fn from(message: T) -> Refused {
            Refused(message.into())
        }
    }

    type CmdResult = Result<(), Refused>;

    pub fn main() -> ExitCode {
        let cli = Cli::parse();
        let result = match cli.command {
            Command::Key(KeyCommand::New(args)) => key_new(*args),
            Command::Key(KeyCommand::Hash(args)) => key_hash(args),
            Command::Keyset(cmd) => keyset(cmd),
            Command::Config(ConfigCommand::Check { strict, files }) => config_check(&files, strict),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(Refused(message)) => {
                if !message.is_empty() {
                    eprintln!("keygate: {message}");
                }
                ExitCode::from(1)
            }
        }
    }

    fn key_new(args: NewArgs) -> CmdResult {
        let mut record = args.fields.record();
        let checksum = args.checksum.map(Checksum::from);
        let format = match args.profile.as_deref().and_then(keygen::profile) {
            Some(p) => {
                record.environment = record.environment.or(p.environment.map(str::to_string));
                record.product = record.product.or(p.product.map(str::to_string));
                KeyFormat {
                    shape: p.shape,
                    prefix: p.prefix.into(),
                    secret_prefix: p.secret_prefix.into(),
                    checksum,
                }
            }
            None => KeyFormat {
                shape: args.format.shape(),
                prefix: args.prefix,
                secret_prefix: args.secret_prefix,
                checksum,
            },
        };
        let mut rng = OsRandom::open().map_err(|e| format!("opening the OS random source: {e}"))?;
        let key = keygen::new_key(&format, args.id.as_deref(), record, &mut rng)
            .map_err(|e| e.to_string())?;

        let mut shown = String::new();
        for (label, value) in &key.presented {
            shown.push_str(&format!("{label}: {value}\n"));
        }
        match &args.secret_file {
            Some(path) => write_secret_file(path, &shown)?,
            None => {
                eprintln!(
                    "# keygate: new {} key '{}'. Store it now: it is shown only this once; keygate keeps only its digest.",
                    format.shape.name(),
                    key.record.id
                );
                eprint!("{shown}");
            }
        }
        let record = serde_json::to_string_pretty(&key.record).map_err(|e| e.to_string())?;
        println!("{record}");
        Ok(())
    }

    /// Creates the file new (never overwrites) with owner-only permissions.
    fn write_secret_file(path: &Path, text: &str) -> CmdResult {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        options
            .open(path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|e| Refused(format!("{}: {e}", path.display())))
    }

    fn key_hash(args: HashArgs) -> CmdResult {
        let mut stdin = io::stdin();
        if stdin.is_terminal() {
            eprintln!("keygate: paste the key, then press Enter (it is read from stdin only):");
        }
        let mut raw = Vec::new();
        stdin
            .by_ref()
            .take(MAX_TOKEN_LEN as u64 + 3)
            .read_to_end(&mut raw)
            .map_err(|e| format!("reading stdin: {e}"))?;
        let text = String::from_utf8(raw).map_err(|_| "the key is not ASCII text")?;
        let key = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        if key.is_empty() {
            return Err("no key on stdin".into());
        }
        if key.len() > MAX_TOKEN_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the filter refuses this key: it must be printable ASCII without spaces, at most {MAX_TOKEN_LEN} bytes, on one line"
            )
            .into());
        }
        if let Some(checksum) = args.checksum.map(Checksum::from) {
            if !checksum.verify(key) {
                return Err("the key fails its checksum: it was mistyped or cut short".into());
            }
        }
        let digest = keygen::digest_of(args.format.shape(), key)?;
        println!("{digest}");
        Ok(())
    }

    /// Records from the given files, or from stdin when there are none.
    fn read_records(files: &[PathBuf]) -> Result<Vec<serde_json::Value>, Refused> {
        let mut records = Vec::new();
        if files.is_empty() {
            let mut text = String::new();
            io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("reading stdin: {e}"))?;
            records.extend(keyset_file::parse_records(&text).map_err(|e| format!("stdin: {e}"))?);
        }
        for path in files {
            let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            records.extend(
                keyset_file::parse_records(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            );
        }
        Ok(records)
    }

    fn keyset(cmd: KeysetCommand) -> CmdResult {
        match cmd {
            KeysetCommand::Build { output, records } => {
                let records = read_records(&records)?;
                keyset_file::validate(&records)?;
                match output {
                    Some(path) => {
                        let serial = keyset_file::save(&path, &records)?;
                        eprintln!(
                            "keygate: wrote {} with {} keys (serial {serial})",
                            path.display(),
                            records.len()
                        );
                    }
                    None => print!(
                        "{}",
                        keyset_file::render(&records, keyset_file::next_serial(None))
                    ),
                }
                Ok(())
            }
            KeysetCommand::Add { keyset, records } => {
                let mut all = keyset_file::load(&keyset, true)?;
                let added = read_records(&records)?;
                if added.is_empty() {
                    return Err("no key records to add".into());
                }
                let count = added.len();
                all.extend(added);
                let serial = keyset_file::save(&keyset, &all)
                    .map_err(|e| format!("{}: not changed: {e}", keyset.display()))?;
                eprintln!(
                    "keygate: {}: added {count} key(s), now {} in all (serial {serial})",
                    keyset.display(),
                    all.len()
                );
                Ok(())
            }
            KeysetCommand::Revoke {
                keyset,
                ids,
                remove,
            } => {
                let mut all = keyset_file::load(&keyset, false)?;
                let how = if remove {
                    Revoke::Remove
                } else {
                    Revoke::Disable
                };
                keyset_file::revoke(&mut all, &ids, how)
                    .map_err(|e| format!("{}: not changed: {e}", keyset.display()))?;
                let serial = keyset_file::save(&keyset, &all)?;
                eprintln!(
                    "keygate: {} {} key(s) in {} (serial {serial})",
                    if remove { "removed" } else { "disabled" },
                    ids.len(),
                    keyset.display()
                );
                Ok(())
            }
            KeysetCommand::Check { files } => {
                let mut failed = 0;
                for path in &files {
                    match keyset_file::load(path, false) {
                        Ok(records) => println!("{}: ok: {} keys", path.display(), records.len()),
                        Err(err) => {
                            failed += 1;
                            // `load` names the file first; the report puts "error:" after it.
                            let shown = format!("{}: ", path.display());
                            let body = err.strip_prefix(&shown).unwrap_or(&err);
                            println!("{shown}error: {body}");
                        }
                    }
                }
                if failed > 0 {
                    return Err(String::new().into());
                }
                Ok(())
            }
        }
    }

    fn config_check(files: &[PathBuf], strict: bool) -> CmdResult {
        let (mut valid, mut invalid, mut warned) = (0, 0, 0);
        // Envoy resolves a config_discovery file from its working directory: check from there.
        let reports = files
            .iter()
            .flat_map(|path| check_file(path, Path::new("")));
        for report in reports {
            let mut shown = report.file.display().to_string();
            if let Some((from, at)) = &report.referenced_from {
                shown.push_str(&format!(" (from {}: {at})", from.display()));
            }
            // The boundary lint reads each file as written, ECDS files included (fail-open and
            // query-credential rules apply to the filter wherever it is defined).
            let text = fs::read_to_string(&report.file).unwrap_or_default();
            for warning in lint_text(&text).unwrap_or_default() {
                let label = if warning.accepted {
                    "accepted"
                } else {
                    warned += 1;
                    "warning"
                };
                println!(
                    "{shown}: {label}[{}]: {}: {}. Fix: {}",
                    warning.rule.id(),
                    warning.location,
                    warning.problem,
                    warning.rule.fix()
                );
            }
            let findings = match report.result {
                Ok(findings) if findings.is_empty() => {
                    let why = if report.referenced_from.is_some() {
                        "skipped: holds no keygate filter"
                    } else {
                        "no keygate filter here: it comes from the config_discovery files below"
                    };
                    println!("{shown}: {why}");
                    continue;
                }
                Ok(findings) => findings,
                Err(err) => {
                    invalid += 1;
                    println!("{shown}: error: {err}");
                    continue;
                }
            };
            for warning in shared_namespace_warnings(&text) {
                warned += 1;
                println!("{shown}: warning[shared-counters]: {warning}");
            }
            for finding in findings {
                let mut at = finding.location.clone();
                if let Some(name) = &finding.filter_name {
                    at.push_str(&format!(" (filter \"{name}\")"));
                }
                let at = if at.is_empty() {
                    String::new()
                } else {
                    format!("{at}: ")
                };
                match finding.outcome {
                    Outcome::Valid(s) => {
                        valid += 1;
                        println!(
                            "{shown}: {at}ok: keygate \"{}\", {} credential source(s), {} inline key(s)",
                            s.name, s.credential_sources, s.keys
                        );
                    }
                    Outcome::Invalid(err) => {
                        invalid += 1;
                        println!("{shown}: {at}error: {}: {}", err.path, err.message);
                    }
                    Outcome::NotKeygate(why) => println!("{shown}: {at}skipped: {why}"),
                }
            }
        }
        println!("{valid} valid, {invalid} refused");
        if invalid > 0 {
            return Err(String::new().into());
        }
        if strict && warned > 0 {
            return Err(format!("{warned} boundary warning(s) (--strict)").into());
        }
        Ok(())
    }
}
