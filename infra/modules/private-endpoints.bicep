// Private endpoints of one storage account (one per storage service: blob, queue, table), each
// registered in its private DNS zone, so that the VNet-integrated Function App reaches the account
// while its firewall denies the public internet. Used by main.bicep only when vnetEnabled.
// https://learn.microsoft.com/azure/storage/common/storage-private-endpoints

@description('Azure region.')
param location string

@description('Name of the storage account.')
param storageAccountName string

@description('Subnet of the private endpoints.')
param subnetId string

@description('Storage services to reach privately, each with its private DNS zone id: [{service, dnsZoneId}].')
param endpoints array

@description('Tags for every resource.')
param tags object = {}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource privateEndpoints 'Microsoft.Network/privateEndpoints@2023-11-01' = [for endpoint in endpoints: {
  name: 'pe-${storageAccountName}-${endpoint.service}'
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: '${storageAccountName}-${endpoint.service}'
        properties: {
          privateLinkServiceId: account.id
          groupIds: [
            endpoint.service
          ]
        }
      }
    ]
  }
}]

resource dnsGroups 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = [for (endpoint, i) in endpoints: {
  parent: privateEndpoints[i]
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: endpoint.service
        properties: {
          privateDnsZoneId: endpoint.dnsZoneId
        }
      }
    ]
  }
}]
