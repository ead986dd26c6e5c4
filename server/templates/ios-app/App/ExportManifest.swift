// atelier_export.json, the manifest `atelier export coreml` writes beside the packages
// (format "atelier-coreml-export", version 1). Unknown fields are ignored.

import Foundation

/// Where the app finds the exported models.
enum ModelSource {
    /// Copied into the app's resources (`atelier export ios-app --embed`).
    case bundled
    /// Picked in the Files app at run time (`atelier export ios-app --import`).
    case imported
}

/// One component of a style: a LoRA and the weight it was merged with.
struct ExportComponent: Codable, Hashable {
    var name: String
    var hash: String?
    var weight: Double?
}

/// A style baked into the export.
struct ExportStyle: Codable, Hashable, Identifiable {
    var name: String
    /// The package function holding this style (multifunction exports).
    var function: String?
    /// "base", "lora" or "blend".
    var kind: String?
    /// The studio's share link for the blend, when there is one.
    var link: String?
    var components: [ExportComponent]?

    var id: String { name }

    /// "ink 0.8 + pastel 0.2", for the picker's caption.
    var summary: String {
        let parts = (components ?? []).map { c in
            c.weight.map { "\(c.name) " + String(format: "%.2f", $0) } ?? c.name
        }
        return parts.isEmpty ? (kind ?? "base") : parts.joined(separator: " + ")
    }
}

struct ExportBaseModel: Codable, Hashable {
    var name: String
    var hash: String?
}

struct ExportSettings: Codable, Hashable {
    var attention: String?
    var precision: String?
    var palettize: Int?
    var quantize: String?
    var chunk_unet: Bool?
    var target: String?
    var width: Int
    var height: Int
    var unet_batch: Int?
    var latent_scaling_factor: Double?
    var multifunction: Bool?
}

struct ExportPackage: Codable, Hashable {
    var name: String
    var path: String
    var bytes: Int64?
    var functions: [String]?
}

struct ExportManifest: Codable {
    var format: String
    var version: Int
    var atelier_version: String?
    var created: String?
    var base_model: ExportBaseModel
    var styles: [ExportStyle]
    var default_style: String?
    var settings: ExportSettings
    var packages: [ExportPackage]

    static let formatName = "atelier-coreml-export"

    /// Reads and checks the manifest in `folder`.
    static func read(in folder: URL) throws -> ExportManifest {
        let url = folder.appendingPathComponent(GeneratedExport.manifestFile)
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw AppError("\(folder.lastPathComponent) has no \(GeneratedExport.manifestFile): pick the folder `atelier export coreml` wrote.")
        }
        let manifest: ExportManifest
        do {
            manifest = try JSONDecoder().decode(ExportManifest.self, from: data)
        } catch {
            throw AppError("\(GeneratedExport.manifestFile) cannot be read: \(error.localizedDescription)")
        }
        guard manifest.format == formatName else {
            throw AppError("\(GeneratedExport.manifestFile) is not an Atelier Core ML export (format \(manifest.format)).")
        }
        guard manifest.version <= 1 else {
            throw AppError("This export was written by a newer Atelier (manifest version \(manifest.version)); regenerate the app.")
        }
        return manifest
    }

    /// Sum of the packages' sizes in bytes.
    var packageBytes: Int64 { packages.reduce(0) { $0 + ($1.bytes ?? 0) } }

    var multifunction: Bool { settings.multifunction ?? false }

    /// Style names as the picker lists them.
    var defaultStyleName: String { default_style ?? styles.first?.name ?? "" }
}

/// An error with a message for people.
struct AppError: LocalizedError {
    let message: String
    init(_ message: String) { self.message = message }
    var errorDescription: String? { message }
}
